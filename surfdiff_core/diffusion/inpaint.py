"""Inpainting: generate some overlayer atoms around others held at known positions (RePaint, Lugmayr et al.
2022), in the one sampler signature with the known part bound by functools.partial:

    sampler = functools.partial(repaint, known=Known(positions, mask), resample=r)
    sampler(model, x, process, *, steps, guidance=None, callback=None, generator=None) -> SlabBatch

Each Euler–Maruyama step moves every movable atom; the known atoms' new state is then replaced by a draw of
the forward kernel q(x_t' | x0 = known) at the step's new time, so the model always sees them as noisy as the
rest. With `resample` r > 1 the step is repeated r times: between repeats all movable atoms are carried back to
the step's start time by the forward transition q(x_t | x_t') (RePaint's jumps of length one), which lets the
generated atoms adjust to the known ones. The final state puts the known atoms exactly (bit for bit) at their
given positions. Cost: r·steps model evaluations. Masked (substrate) atoms never move.

Forward kernels, as the process defines them (process.py): in-plane a wrapped normal whose variance grows as
σ_t² L² (increments σ_t² − σ_s²); along z the VP transition, mean z_c + (α_t/α_s)(z_s − z_c) and variance
(1 − α_t²/α_s²) L², truncated to the box (exact from x0; from x_s it is the usual approximation of the walls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion, truncated_normal
from surfdiff_core.diffusion.steps import em_step, run_steps
from surfdiff_core.geometry.batch import SlabBatch


@dataclass(frozen=True)
class Known:
    """Atoms held fixed during generation: `mask` [N] marks them (movable atoms only), `positions` [N,3] holds
    their positions (rows of other atoms are ignored)."""

    positions: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def tile(cls, positions: torch.Tensor, mask: torch.Tensor, n: int) -> Known:
        """The same known atoms in each of n structures of one system (per-structure rows repeated)."""
        return cls(positions=positions.repeat(n, 1), mask=mask.repeat(n))

    def apply(self, pos: torch.Tensor, known_pos: torch.Tensor | None = None) -> torch.Tensor:
        """pos with the known rows replaced (by known_pos, default their clean positions)."""
        src = self.positions if known_pos is None else known_pos
        return torch.where(self.mask[:, None], src.to(pos.dtype), pos)


def forward_transition(
    process: SurfaceDiffusion,
    geo: SlabGeometry,
    pos: torch.Tensor,
    s: float,
    t: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A draw of q(x_t | x_s) for s < t (s = 0: the kernel from clean positions) for every movable atom."""
    sch, L = process.schedule, process.length_scale
    ratio = sch.alpha(t) / sch.alpha(s) if s > 0 else sch.alpha(t)
    std_xy = math.sqrt(max(sch.sigma(t) ** 2 - (sch.sigma(s) ** 2 if s > 0 else 0.0), 0.0)) * L
    std_z = math.sqrt(max(1.0 - ratio * ratio, 0.0)) * L
    xi = torch.randn((pos.shape[0], 2), generator=generator, device=pos.device, dtype=pos.dtype)
    xy = pos[:, :2] + std_xy * xi
    z0 = torch.minimum(torch.maximum(pos[:, 2], geo.z_lo), geo.z_hi)
    mean_z = geo.z_center + ratio * (z0 - geo.z_center)
    z = truncated_normal(mean_z, pos.new_tensor(max(std_z, 1e-12)), geo.z_lo, geo.z_hi, generator)
    new = geo.wrap(torch.cat([xy, z[:, None]], dim=1))
    return torch.where(geo.movable[:, None], new, pos)


@torch.no_grad()
def repaint(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 500,
    guidance: Guidance | None = None,
    callback=None,
    generator: torch.Generator | None = None,
    known: Known,
    resample: int = 1,
) -> SlabBatch:
    """Euler–Maruyama with the known atoms replaced by forward-noised copies after every step and `resample`
    back-and-forth repeats per step (RePaint); the known atoms end exactly at `known.positions`."""
    if resample < 1:
        raise ValueError("resample must be >= 1")
    if known.mask.shape != x.movable.shape or known.positions.shape != x.positions.shape:
        raise ValueError("Known needs one row per atom of the batch")
    if bool((known.mask & ~x.movable).any()):
        raise ValueError("known atoms must be movable overlayer atoms (the substrate is fixed already)")
    geo = process.geometry(x)
    pos = geo.confine(x.positions)
    pos = known.apply(pos, forward_transition(process, geo, known.apply(pos), 0.0, process.time_grid(steps)[0],
                                              generator))

    def step(pos: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        for u in range(resample):
            pos = em_step(model, x, pos, t, t_next, process, geo, guidance, generator)
            pos = known.apply(pos, forward_transition(process, geo, known.apply(pos), 0.0, t_next, generator))
            if u < resample - 1:
                pos = forward_transition(process, geo, pos, t_next, t, generator)
        return pos

    def exact_at_the_end(i: int, t_next: float, xb: SlabBatch) -> None:
        callback(i, t_next, xb.with_positions(known.apply(xb.positions)) if i == steps - 1 else xb)

    pos = run_steps(x, process, geo, steps, step, exact_at_the_end if callback is not None else None, pos)
    return x.with_positions(known.apply(pos))
