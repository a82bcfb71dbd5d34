"""Cheap geometric validity checks for generated slabs, vectorised over the batch.

A structure is invalid when
* any pair involving a movable atom (overlayer–overlayer or overlayer–substrate, in-plane periodic
  images included) is closer than `min_distance` (substrate–substrate pairs are given, not generated);
* a movable atom lies outside its z box (beyond a small round-off tolerance);
* any position is not finite.
"""

from __future__ import annotations

import torch

from surfdiff_core.geometry.batch import SlabBatch
from surfdiff_core.geometry.neighbors import neighbor_list, pair_vectors


def check_validity(
    batch: SlabBatch, min_distance: float = 1.0, *, z_tol: float = 1e-4
) -> tuple[torch.Tensor, list[str]]:
    """Return (valid [B] bool, reasons): one reason string per structure, "" for valid ones.

    Atoms must be grouped by structure in `batch` (as `collate` produces), which the neighbour list needs.
    """
    n_struct, idx = batch.n_structures, batch.batch
    pos = batch.positions.detach()
    finite_atom = torch.isfinite(pos).all(-1)
    nonfinite = torch.zeros(n_struct, dtype=torch.long, device=pos.device).index_add_(0, idx, (~finite_atom).long())
    # Non-finite atoms are parked at the origin for the pair search; their structure is invalid anyway.
    safe = batch.with_positions(torch.where(finite_atom[:, None], pos, torch.zeros_like(pos)))

    nl = neighbor_list(safe, min_distance)
    keep = batch.movable[nl.i] | batch.movable[nl.j]
    dist = torch.linalg.norm(pair_vectors(safe.positions, nl), dim=-1)[keep]
    pair_struct = idx[nl.i][keep]
    n_close = torch.zeros(n_struct, dtype=torch.long, device=pos.device).index_add_(
        0, pair_struct, torch.ones_like(pair_struct)
    )
    dmin = torch.full((n_struct,), float("inf"), dtype=pos.dtype, device=pos.device)
    dmin = dmin.scatter_reduce(0, pair_struct, dist, reduce="amin", include_self=True)

    zb = batch.z_bounds[idx]
    outside = batch.movable & finite_atom & ((pos[:, 2] < zb[:, 0] - z_tol) | (pos[:, 2] > zb[:, 1] + z_tol))
    n_out = torch.zeros(n_struct, dtype=torch.long, device=pos.device).index_add_(0, idx, outside.long())

    valid = (n_close == 0) & (n_out == 0) & (nonfinite == 0)
    # Strings only for the (few) invalid structures; the checks above are all batched.
    reasons = [""] * n_struct
    close_c, dmin_c, out_c, nf_c = (v.cpu().tolist() for v in (n_close, dmin, n_out, nonfinite))
    for b in (~valid).nonzero().squeeze(1).cpu().tolist():
        parts = []
        if nf_c[b]:
            parts.append(f"{nf_c[b]} atoms with non-finite positions")
        if close_c[b]:
            # n_close counts both orderings of each pair
            n_pairs = close_c[b] // 2 or 1
            parts.append(f"{n_pairs} pairs closer than {min_distance:.2f} Å (min {dmin_c[b]:.3f} Å)")
        if out_c[b]:
            parts.append(f"{out_c[b]} movable atoms outside the z box")
        reasons[b] = "; ".join(parts)
    return valid, reasons
