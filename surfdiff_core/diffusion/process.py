"""Forward diffusion process on surface slabs: periodic in-plane, VP with a truncated kernel along z.

Conventions (shared with the samplers and the denoiser):

* The schedule (`VPSchedule`) is dimensionless; a global length scale L (`length_scale`, Å, default
  10) turns it into a kernel std σ_t·L. L is a model hyper-parameter fixed between training and
  sampling, so the noise level at time t is the same in every cell. The noise is isotropic in Cartesian
  space: the same std σ_t·L in-plane and along z.
* The cell's first two vectors a1, a2 must lie in the xy plane (standard for slabs). The slab is
  periodic along them only; z is never wrapped.
* In-plane the VP drift is dropped (shrinking toward a point is undefined on a torus; DiffCSP does
  the same): x_t = wrap(x0 + σ_t L ε), a wrapped normal N(x0, σ_t² L²). Because the variance still
  has to grow as σ_t², the in-plane forward SDE is dx = g dW with g² = d(σ_t² L²)/dt = β α_t² L²
  (not β L²); the samplers use this g for the in-plane reverse process.
* Along z the process is VP with drift toward the box centre z_c: mean z_c + α_t (z0 − z_c),
  std σ_t L, truncated to the box [z_min, z_max] (exact inverse-CDF sampling). The truncation
  normaliser depends on z0 only, so the score w.r.t. z_t is the Gaussian one inside the box.
* Score and eps: eps = −σ_t L ∇_{x_t} log p(x_t | x0), i.e. score = −eps / (σ_t L). In-plane the
  score is that of the wrapped normal, summed over periodic images (real-space images for narrow
  kernels, the Poisson-summed reciprocal series for broad ones), so it is right at every σ: it is the
  minimum-image displacement for small σ and vanishes when σ_t L ≫ cell, where a plain minimum-image
  target would be biased. The training target is eps_target(x_t, x0); the DSM loss is the mean over
  movable atoms of ‖eps_pred − eps_target‖².
* The marginals of the truncated z kernel are not those of the VP diffusion with walls, so near the
  walls the reverse dynamics in z use the kernel's own probability-flow velocity
  (`SurfaceDiffusion.z_flow_velocity`, zero flux through the walls) instead of the plain VP drift;
  away from the walls the two coincide. It needs the posterior over x0 beyond its mean (which is all
  eps gives) only near the walls, so there samplers carry a small bias (~5 % of the spread of data
  lying within 3 std of a wall in the tests).
* The limiting distribution, used as the sampler's prior, is uniform over the box: uniform over the
  cell in-plane and uniform in [z_min, z_max]. At t = 1 (σ₁L ≈ 8.8 Å with the defaults) the in-plane
  marginal is uniform to ~1e-10 for cells of a few Å; the z marginal deviates from uniform by a relative
  amount of order ((z_max − z_min) / σ₁L)², a few per cent for a 6 Å box.
* Masked (movable=False) atoms are never noised, moved or wrapped; their eps target is zero.
* Random draws take an optional torch.Generator, which must live on the batch's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.geometry.batch import SlabBatch

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


@dataclass(frozen=True)
class SlabGeometry:
    """Per-atom view of a batch's fixed geometry (cell, box, mask), computed once per run.

    Used by the process, the samplers and the relaxation so that wrapping and confinement are done
    identically everywhere.
    """

    lattice: torch.Tensor  # [N, 2, 2] in-plane lattice of each atom's structure
    inv_lattice: torch.Tensor  # [N, 2, 2]
    z_lo: torch.Tensor  # [N]
    z_hi: torch.Tensor  # [N]
    z_center: torch.Tensor  # [N]
    movable: torch.Tensor  # [N] bool

    @classmethod
    def from_batch(cls, batch: SlabBatch) -> SlabGeometry:
        check_slab_cell(batch.cell)
        lat, inv = in_plane_lattice(batch.cell)
        zb = batch.z_bounds[batch.batch]
        return cls(
            lattice=lat[batch.batch],
            inv_lattice=inv[batch.batch],
            z_lo=zb[:, 0],
            z_hi=zb[:, 1],
            z_center=zb.mean(-1),
            movable=batch.movable,
        )

    def wrap(self, positions: torch.Tensor) -> torch.Tensor:
        """Wrap movable atoms into the cell in-plane (fractional a1, a2 coords in [0, 1))."""
        frac = wrap_fractional(_to_frac(positions[:, :2], self.inv_lattice))
        new = torch.cat([_to_cart(frac, self.lattice), positions[:, 2:]], dim=1)
        return torch.where(self.movable[:, None], new, positions)

    def confine(self, positions: torch.Tensor) -> torch.Tensor:
        """Wrap movable atoms in-plane and clamp them into the z box; masked atoms untouched."""
        z = torch.minimum(torch.maximum(positions[:, 2], self.z_lo), self.z_hi)
        new = self.wrap(torch.cat([positions[:, :2], z[:, None]], dim=1))
        return torch.where(self.movable[:, None], new, positions)

    def minimum_image(self, d_xy: torch.Tensor) -> torch.Tensor:
        return minimum_image(d_xy, self.lattice, self.inv_lattice)

    def uniform(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Positions drawn uniformly over the box for every atom (callers mask)."""
        n = self.lattice.shape[0]
        u = torch.rand((n, 3), generator=generator, device=self.lattice.device, dtype=self.lattice.dtype)
        xy = _to_cart(u[:, :2], self.lattice)
        z = self.z_lo + u[:, 2] * (self.z_hi - self.z_lo)
        return torch.cat([xy, z[:, None]], dim=1)


def uniform_box_prior(batch: SlabBatch, generator: torch.Generator | None = None) -> SlabBatch:
    """Movable atoms uniform over the box (cell × [z_min, z_max]); masked atoms where they are. The prior of
    the diffusion (its limiting distribution) and of flow matching."""
    geo = SlabGeometry.from_batch(batch)
    return batch.with_positions(torch.where(batch.movable[:, None], geo.uniform(generator), batch.positions))


def movable_mse(pred: torch.Tensor, target: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
    """Mean over movable atoms of ‖pred − target‖²: the vector head's loss under either process."""
    err = ((pred - target) ** 2).sum(-1)
    mov = batch.movable.to(err.dtype)
    return (err * mov).sum() / mov.sum().clamp_min(1.0)


@dataclass(frozen=True)
class SurfaceDiffusion:
    schedule: VPSchedule = field(default_factory=VPSchedule)
    length_scale: float = 10.0
    t_min: float = 1e-3

    def __post_init__(self) -> None:
        if self.length_scale <= 0:
            raise ValueError("length_scale must be positive")
        if not 0 < self.t_min < 1:
            raise ValueError("t_min must be in (0, 1)")

    # -- helpers --------------------------------------------------------------------------------
    def geometry(self, batch: SlabBatch) -> SlabGeometry:
        return SlabGeometry.from_batch(batch)

    def std(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """Kernel std σ_t·L in Å."""
        return self.schedule.sigma(t) * self.length_scale

    def sample_time(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Training times t ~ U(t_min, 1), shape [n]."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (1.0 - self.t_min) * u

    def time_grid(self, steps: int, power: float = 1.0) -> list[float]:
        """Sampling times 1 = t_0 > t_1 > … > t_steps = t_min: t_i = t_min + (1 − t_min)(1 − i/steps)^power.

        power 1 is the paper's uniform grid; power > 1 puts more steps at small t, where the score
        changes fastest (used by the few-step ODE sampler).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) ** power
        return (self.t_min + (1.0 - self.t_min) * u).tolist()

    def _per_structure_time(self, t: torch.Tensor | float, batch: SlabBatch) -> torch.Tensor:
        t = torch.as_tensor(t, device=batch.device, dtype=batch.positions.dtype)
        return t.expand(batch.n_structures) if t.ndim == 0 else t

    def z_flow_velocity(
        self, z: torch.Tensor, eps_z: torch.Tensor, t: torch.Tensor | float, geo: SlabGeometry
    ) -> torch.Tensor:
        """Forward-time probability-flow velocity dz/dt [N] of the truncated z kernel (Å per unit time).

        For the kernel TN(m_t, s_t²; [lo, hi]) with CDF F the conditional velocity is u = −∂_t F / p:
        the Gaussian part ṁ + (ṡ/s)(z − m), which equals the naive f − ½g²·score, plus a boundary term
        from the t-dependent truncation normaliser. The boundary term makes the normal velocity vanish
        at the walls (no probability flux out of the box); without it the ODE contracts the uniform
        prior toward the box centre. The marginal velocity is E[u | z_t]; the kernel mean is plugged in
        as its posterior estimate m̂ = z − s·eps, which is exact for the Gaussian part, far from the
        walls and when σ_t L ≫ box (where u → 0).
        """
        dtype = z.dtype
        tt = torch.as_tensor(t, dtype=torch.float64, device=z.device)
        zz, e = z.double(), eps_z.double()
        lo, hi, zc = geo.z_lo.double(), geo.z_hi.double(), geo.z_center.double()
        b, a, sg = self.schedule.beta(tt), self.schedule.alpha(tt), self.schedule.sigma(tt)
        s = sg * self.length_scale
        m = zz - s * e
        m_dot = -0.5 * b * (m - zc)
        rate = 0.5 * b * a * a / (sg * sg)  # ṡ/s
        lo_n, hi_n = (lo - m) / s, (hi - m) / s
        zeta = torch.minimum(torch.maximum((zz - m) / s, lo_n), hi_n)
        log_z = log_ndtr_diff(lo_n, hi_n)
        w_lo = torch.exp(0.5 * (zeta**2 - lo_n**2) + log_ndtr_diff(zeta, hi_n) - log_z)
        w_hi = torch.exp(0.5 * (zeta**2 - hi_n**2) + log_ndtr_diff(lo_n, zeta) - log_z)
        u = m_dot + rate * (zz - m)
        u = u - w_lo * (m_dot + rate * (lo - m)) - w_hi * (m_dot + rate * (hi - m))
        return u.to(dtype)

    # -- public API -----------------------------------------------------------------------------
    def wrap(self, batch: SlabBatch) -> SlabBatch:
        """Movable atoms wrapped into the cell in-plane; masked atoms and z untouched."""
        return batch.with_positions(self.geometry(batch).wrap(batch.positions))

    def sample_prior(self, batch: SlabBatch, generator: torch.Generator | None = None) -> SlabBatch:
        """The limiting distribution: movable atoms uniform over the box (cell × [z_min, z_max])."""
        return uniform_box_prior(batch, generator)

    def perturb(
        self,
        batch: SlabBatch,
        t: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> tuple[SlabBatch, torch.Tensor]:
        """Sample x_t ~ p(x_t | x0 = batch) at per-structure times t [B]; return (x_t, eps_target [N,3])."""
        geo = self.geometry(batch)
        tb = self._per_structure_time(t, batch)[batch.batch]
        a = self.schedule.alpha(tb)
        s = self.std(tb)
        x0 = batch.positions
        mov = batch.movable

        noise = torch.randn((batch.n_atoms, 2), generator=generator, device=x0.device, dtype=x0.dtype)
        xy_t = x0[:, :2] + s[:, None] * noise
        mean_z = geo.z_center + a * (x0[:, 2] - geo.z_center)
        z_t = truncated_normal(mean_z, s, geo.z_lo, geo.z_hi, generator)
        pos_t = geo.wrap(torch.cat([xy_t, z_t[:, None]], dim=1))
        pos_t = torch.where(mov[:, None], pos_t, x0)

        # The lattice sum is the expensive part: evaluate it for movable atoms only.
        eps = torch.zeros_like(x0)
        idx = mov.nonzero().squeeze(1)
        s_m = s[idx]
        score_xy = wrapped_normal_score(pos_t[idx, :2] - x0[idx, :2], s_m * s_m, geo.lattice[idx], geo.inv_lattice[idx])
        eps[idx, :2] = -s_m[:, None] * score_xy
        eps[idx, 2] = (pos_t[idx, 2] - mean_z[idx]) / s_m
        return batch.with_positions(pos_t), eps

    def eps_to_score(self, eps: torch.Tensor, batch: SlabBatch, t: torch.Tensor | float) -> torch.Tensor:
        """score = −eps / (σ_t L) per atom (Å⁻¹); zero on masked atoms."""
        s = self.std(self._per_structure_time(t, batch))[batch.batch]
        return torch.where(batch.movable[:, None], -eps / s[:, None], torch.zeros_like(eps))

    def score_to_eps(self, score: torch.Tensor, batch: SlabBatch, t: torch.Tensor | float) -> torch.Tensor:
        """eps = −σ_t L · score per atom; zero on masked atoms."""
        s = self.std(self._per_structure_time(t, batch))[batch.batch]
        return torch.where(batch.movable[:, None], -score * s[:, None], torch.zeros_like(score))

    def training_loss(self, eps_pred: torch.Tensor, eps_target: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
        """The vector head's loss (the one name every generative process gives it): denoising score matching."""
        return self.dsm_loss(eps_pred, eps_target, batch)

    def dsm_loss(self, eps_pred: torch.Tensor, eps_target: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
        """Denoising score matching: mean over movable atoms of ‖eps_pred − eps_target‖²."""
        return movable_mse(eps_pred, eps_target, batch)
