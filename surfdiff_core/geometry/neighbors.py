"""Batched neighbour lists for slabs that are periodic along a1, a2 only.

All structures of a `SlabBatch` are handled at once: atoms are padded to the largest structure,
every (i, j, image) candidate is tested in one broadcast, and `nonzero` picks the pairs. For the
small cells of surface models (tens of atoms, a handful of images) this brute force on dense
tensors is faster than cell lists, has no Python loop over structures, and runs unchanged on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surfdiff_core.geometry.batch import SlabBatch

__all__ = ["NeighborList", "neighbor_list", "pair_vectors"]

# Largest number of candidate (structure, i, j, image) entries tested in one broadcast; bounds the
# temporary memory (~40 bytes per entry in float64) for big batches, which are then processed in chunks.
_MAX_CANDIDATES = 1 << 22


@dataclass(frozen=True)
class NeighborList:
    """Full pair list (both i->j and j->i): r_ij = positions[j] + shifts - positions[i]."""

    i: torch.Tensor  # [P] long, centre atom (global index), sorted ascending
    j: torch.Tensor  # [P] long, neighbour atom (global index)
    shifts: torch.Tensor  # [P, 3] Cartesian periodic shift, same dtype as the positions

    @property
    def n_pairs(self) -> int:
        return int(self.i.shape[0])


def pair_vectors(positions: torch.Tensor, nl: NeighborList) -> torch.Tensor:
    """Differentiable pair vectors r_ij = R_j + shift_ij - R_i, shape [P, 3]."""
    return positions.index_select(0, nl.j) - positions.index_select(0, nl.i) + nl.shifts


def _inplane_frame(cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the in-plane frame (a1, a2, unit normal) and the two in-plane cell heights.

    a3 is replaced by the unit surface normal: z is not periodic, so a3 (possibly tilted or
    degenerate) must not influence which in-plane images are needed.
    """
    a1, a2 = cell[:, 0], cell[:, 1]
    normal = torch.linalg.cross(a1, a2)
    area = torch.linalg.vector_norm(normal, dim=-1)  # [B]
    if bool((area <= 1e-12).any()):
        raise ValueError("degenerate in-plane cell (a1 x a2 = 0)")
    frame = torch.stack([a1, a2, normal / area[:, None]], dim=1)
    # heights between lattice lines: h1 = area / |a2|, h2 = area / |a1|
    heights = torch.stack(
        [area / torch.linalg.vector_norm(a2, dim=-1), area / torch.linalg.vector_norm(a1, dim=-1)], dim=-1
    )
    return torch.linalg.inv(frame), heights


def neighbor_list(batch: SlabBatch, cutoff: float, *, half: bool = False) -> NeighborList:
    """All pairs closer than `cutoff`, with in-plane periodic images.

    Works for cells smaller than 2 * cutoff (several images of the same atom are then neighbours,
    and an atom can neighbour its own images). Pairs are found without gradient; use
    `pair_vectors` to get differentiable vectors. Pairs are sorted by structure, then i.
    half=True: each pair once (i < j, and for an atom paired with its own image one of the two
    opposite images), as wanted by `PaiNN(..., half_list=True)`.
    In float32 the test d^2 < cutoff^2 is exact to ~1e-5 Å; pairs that close to the cutoff carry
    zero weight under a smooth cutoff function.
    """
    with torch.no_grad():
        return _neighbor_list(batch, float(cutoff), half)


def _neighbor_list(batch: SlabBatch, cutoff: float, half: bool) -> NeighborList:
    pos = batch.positions.detach()
    cell = batch.cell.detach()
    device, dtype = pos.device, pos.dtype
    n_struct = batch.n_structures
    counts = batch.atoms_per_structure()
    if pos.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return NeighborList(empty, empty, torch.zeros(0, 3, dtype=dtype, device=device))

    # Wrap into the in-plane cell so that one ring of images per cell height suffices; the
    # integer wrap is added back into the shifts, so callers keep their unwrapped positions.
    inv_frame, heights = _inplane_frame(cell)
    frac = torch.einsum("nc,ncd->nd", pos, inv_frame[batch.batch])
    wrap = -torch.floor(frac[:, :2])  # [N, 2] integer lattice translation applied to each atom
    pos_w = pos + torch.einsum("nk,nkd->nd", wrap, cell[batch.batch, :2])

    # Image range: a pair separated by n lattice lines is at least (|n| - 1) * h apart.
    n_img = torch.ceil(cutoff / heights).long()  # [B, 2]
    n1, n2 = (int(v) for v in n_img.amax(dim=0).tolist())
    r1 = torch.arange(-n1, n1 + 1, device=device)
    r2 = torch.arange(-n2, n2 + 1, device=device)
    images = torch.cartesian_prod(r1, r2).to(dtype)  # [K, 2], the zero image at index K // 2
    n_images = images.shape[0]
    img_shift = images @ cell[:, :2]  # [B, K, 3] Cartesian image shifts
    img_sq = img_shift.square().sum(-1)  # [B, K]

    # Pad atoms to [B, n_max]; padded slots sit at infinity, their d2 is inf or nan and never < cut2.
    n_max = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(pos.shape[0], device=device) - starts[batch.batch]
    padded = torch.full((n_struct, n_max, 3), math.inf, dtype=dtype, device=device)
    padded[batch.batch, local] = pos_w
    # candidates that are never pairs: the atom itself in the zero image, and for a half list the
    # lower triangle plus half of the self-images (images[K - 1 - k] = -images[k])
    ar = torch.arange(n_max, device=device)
    if half:
        kk = torch.arange(n_images, device=device)
        allowed = (ar[:, None, None] < ar[None, :, None]) | (
            (ar[:, None, None] == ar[None, :, None]) & (kk > n_images // 2)
        )
        allowed = allowed.reshape(-1)
    else:
        self_pair = (ar * (n_max + 1)) * n_images + n_images // 2

    # Process structures in chunks so the [b, i, j, K] candidate tensor stays bounded.
    per_struct = n_max * n_max * n_images
    chunk = max(1, _MAX_CANDIDATES // per_struct)
    cut2 = cutoff * cutoff
    found = []
    for b0 in range(0, n_struct, chunk):
        p = padded[b0 : b0 + chunk]
        nb = p.shape[0]
        diff = (p[:, None, :, :] - p[:, :, None, :]).reshape(nb, n_max * n_max, 3)  # R_j - R_i
        # |d + S|^2 = |d|^2 + 2 d.S + |S|^2, with d.S as one batched matmul (no [.., K, 3] temporary)
        dS = torch.bmm(diff, img_shift[b0 : b0 + chunk].transpose(1, 2))  # [b, i*j, K]
        d2 = torch.add(diff.square().sum(-1, keepdim=True) + img_sq[b0 : b0 + chunk, None, :], dS, alpha=2.0)
        mask = (d2 < cut2).view(nb, -1)
        if half:
            mask &= allowed
        else:
            mask[:, self_pair] = False
        flat = mask.view(-1).nonzero().squeeze(1)  # sorted: by structure, then i, then j, then image
        found.append(flat + b0 * per_struct)
    flat = torch.cat(found) if len(found) > 1 else found[0]

    b = torch.div(flat, per_struct, rounding_mode="floor")
    rest = flat - b * per_struct
    ij = torch.div(rest, n_images, rounding_mode="floor")
    k = rest - ij * n_images
    li = torch.div(ij, n_max, rounding_mode="floor")
    lj = ij - li * n_max
    start_b = starts.index_select(0, b)
    gi = start_b + li
    gj = start_b + lj
    # Cartesian shift relative to the caller's (unwrapped) positions: image + wrap_j - wrap_i.
    wrap_cart = pos_w - pos
    shifts = (
        img_shift.reshape(-1, 3).index_select(0, b * n_images + k)
        + wrap_cart.index_select(0, gj)
        - wrap_cart.index_select(0, gi)
    )
    return NeighborList(gi, gj, shifts)
