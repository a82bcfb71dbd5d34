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

The wrapped and truncated normals themselves, and the in-plane lattice helpers, live in distributions.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Also imported from here by the samplers, inpainting and the tests: this module was their home.
from surfdiff_core.diffusion.distributions import (
    _to_cart,
    _to_frac,
    check_slab_cell,
    in_plane_lattice,
    log_ndtr_diff,
    minimum_image,
    truncated_normal,
    wrap_fractional,
    wrapped_normal_score,
)
from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.geometry.batch import SlabBatch


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
