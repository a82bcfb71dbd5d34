"""The two distributions the diffusion process is built from (process.py states the conventions): the isotropic
normal wrapped on the in-plane lattice, whose score is a lattice sum, and the normal truncated to the z box, sampled
exactly; with the in-plane lattice helpers (fractional coordinates, wrapping, minimum image) they share with the
process's geometry."""

from __future__ import annotations

import math

import torch

# Gaussian tails beyond this many std in mirrored coordinates are sampled with the exponential-tail
# approximation: ndtr underflows long before the tail stops mattering (relative error ~ 1/20² there).
_TAIL_SWITCH = 20.0


def in_plane_lattice(cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-plane 2x2 lattice (rows a1_xy, a2_xy) of each cell [B,3,3] and its inverse."""
    lat = cell[..., :2, :2]
    return lat, torch.linalg.inv(lat)


def check_slab_cell(cell: torch.Tensor, tol: float = 1e-6) -> None:
    """Raise if a1 or a2 has a z component: the in-plane / z split of the process relies on it."""
    if cell.numel() and bool((cell[:, :2, 2].abs() > tol).any()):
        raise ValueError("slab cells need a1, a2 in the xy plane (cell[:, :2, 2] == 0)")


def _to_frac(xy: torch.Tensor, inv_lat: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...i,...ij->...j", xy, inv_lat)


def _to_cart(frac: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...i,...ij->...j", frac, lat)


def _offsets(k1: int, k2: int, like: torch.Tensor) -> torch.Tensor:
    r1 = torch.arange(-k1, k1 + 1, device=like.device, dtype=like.dtype)
    r2 = torch.arange(-k2, k2 + 1, device=like.device, dtype=like.dtype)
    return torch.cartesian_prod(r1, r2).reshape(-1, 2)


def wrap_fractional(frac: torch.Tensor) -> torch.Tensor:
    """Fractional coordinates into [0, 1)."""
    f = frac - torch.floor(frac)
    # x - floor(x) rounds to exactly 1.0 for tiny negative x in floating point.
    return torch.where(f >= 1.0, f - 1.0, f)


def minimum_image(d_xy: torch.Tensor, lat: torch.Tensor, inv_lat: torch.Tensor) -> torch.Tensor:
    """Shortest periodic image of in-plane displacements d_xy [N,2] (per-atom lattices [N,2,2]).

    Rounding in fractional coordinates is not enough for skewed (e.g. hexagonal) cells, so the 3x3
    neighbouring images of the rounded displacement are compared as well.
    """
    f = _to_frac(d_xy, inv_lat)
    f = f - torch.round(f)
    cand = _to_cart(f[:, None, :] + _offsets(1, 1, f)[None], lat[:, None])  # [N, 9, 2]
    best = (cand * cand).sum(-1).argmin(-1)
    return cand[torch.arange(cand.shape[0], device=cand.device), best]


def _score_real_space(f: torch.Tensor, var: torch.Tensor, lat: torch.Tensor, n_std: float) -> torch.Tensor:
    """Lattice sum over images within n_std std: softmax-weighted mean displacement."""
    area = torch.linalg.det(lat).abs()
    h = area[:, None] / torch.linalg.norm(lat, dim=-1).flip(-1)  # h1 = |det|/|a2|, h2 = |det|/|a1|
    reach = (n_std * var.sqrt()[:, None] / h).amax(0)
    k1, k2 = (int(math.ceil(float(r))) + 1 for r in reach)
    off = f[:, None, :] + _offsets(k1, k2, f)[None]  # [N, M, 2] fractional images
    disp = off[..., :1] * lat[:, None, 0] + off[..., 1:] * lat[:, None, 1]
    w = torch.softmax(-(disp * disp).sum(-1) / (2.0 * var[:, None]), dim=-1)
    return -(w[..., None] * disp).sum(1) / var[:, None]


def _score_reciprocal(
    f: torch.Tensor, var: torch.Tensor, lat: torch.Tensor, inv_lat: torch.Tensor, n_std: float
) -> torch.Tensor:
    """Poisson-summed form: density ∝ Σ_G exp(−var|G|²/2) cos(G·d), with G·d = 2π n·f."""
    reach = (n_std * torch.linalg.norm(lat, dim=-1) / (2 * math.pi * var.sqrt()[:, None])).amax(0)
    k1, k2 = (int(math.ceil(float(r))) for r in reach)
    n = _offsets(k1, k2, f)  # [M, 2] integer reciprocal coordinates
    recip = 2 * math.pi * inv_lat.transpose(-1, -2)  # rows b1, b2 with a_i·b_j = 2π δ_ij
    g = n[None, :, :1] * recip[:, None, 0] + n[None, :, 1:] * recip[:, None, 1]  # [N, M, 2]
    c = torch.exp(-0.5 * var[:, None] * (g * g).sum(-1))
    phase = 2 * math.pi * (f[:, None, :] * n[None]).sum(-1)
    num = ((c * torch.sin(phase))[..., None] * g).sum(1)
    return -num / (c * torch.cos(phase)).sum(1, keepdim=True)


def wrapped_normal_score(
    d_xy: torch.Tensor,
    var: torch.Tensor,
    lat: torch.Tensor,
    inv_lat: torch.Tensor,
    *,
    n_std: float = 5.0,
) -> torch.Tensor:
    """∇_d log Σ_k N(d + k·A; 0, var·I₂): score of an isotropic 2D normal wrapped on the lattice A.

    d_xy [N,2] is x − centre (any image), var [N] the variance in Å², lat/inv_lat [N,2,2] per-atom
    lattices. Narrow kernels (std below the smallest plane spacing) sum the real-space images within
    n_std std (a softmax over images; −minimum_image(d)/var for var ≪ cell); broad ones use the
    Poisson-summed reciprocal-space series, which needs only a few terms there. Both are truncated at
    a relative weight ~exp(−n_std²/2), so the cost is a few dozen terms per atom for any var.
    """
    out = torch.zeros_like(d_xy)
    if d_xy.shape[0] == 0:
        return out
    f = _to_frac(d_xy, inv_lat)
    f = f - torch.round(f)
    area = torch.linalg.det(lat).abs()
    h_min = (area[:, None] / torch.linalg.norm(lat, dim=-1)).amin(-1)
    broad = var.sqrt() > h_min
    narrow_idx, broad_idx = (~broad).nonzero().squeeze(1), broad.nonzero().squeeze(1)
    if narrow_idx.numel():
        out[narrow_idx] = _score_real_space(f[narrow_idx], var[narrow_idx], lat[narrow_idx], n_std)
    if broad_idx.numel():
        i = broad_idx
        out[i] = _score_reciprocal(f[i], var[i], lat[i], inv_lat[i], n_std)
    return out


def truncated_normal(
    mean: torch.Tensor,
    std: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact samples of N(mean, std²) truncated to [lo, hi] (elementwise, broadcast to mean's shape).

    Inverse CDF in float64. Intervals above the mean are mirrored below it so that ndtr is evaluated in
    its accurate lower tail; intervals further than 20 std out use the exponential tail approximation
    (ndtr underflows there). Results are clamped into [lo, hi] against round-off.
    """
    out_dtype = mean.dtype
    m, s, a_lo, a_hi = (torch.broadcast_to(v, mean.shape).double() for v in (mean, std, lo, hi))
    s = s.clamp_min(1e-300)
    a = (a_lo - m) / s
    b = (a_hi - m) / s
    flip = (a + b) > 0
    a2 = torch.where(flip, -b, a)
    b2 = torch.where(flip, -a, b)
    u = torch.rand(m.shape, generator=generator, device=m.device, dtype=torch.float64)
    pa, pb = torch.special.ndtr(a2), torch.special.ndtr(b2)
    x_cdf = torch.special.ndtri(pa + u * (pb - pa))
    # Far tail: density ∝ exp(−|b2| y) for the distance y = b2 − x ∈ [0, b2 − a2].
    lam = (-b2).clamp_min(1.0)
    width = (b2 - a2).clamp_min(0.0)
    y = -torch.log1p(-u * (-torch.expm1(-lam * width))) / lam
    x = torch.where(b2 < -_TAIL_SWITCH, b2 - y, x_cdf)
    x = torch.where(flip, -x, x)
    out = torch.minimum(torch.maximum(m + s * x, a_lo), a_hi)
    return out.to(out_dtype)


def log_ndtr_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(Φ(y) − Φ(x)) for x ≤ y, accurate in both tails (mirrored into the lower tail)."""
    flip = (x + y) > 0
    lo = torch.where(flip, -y, x)
    hi = torch.where(flip, -x, y)
    l_hi = torch.special.log_ndtr(hi)
    return l_hi + torch.log1p(-torch.exp((torch.special.log_ndtr(lo) - l_hi).clamp(max=0.0)))
