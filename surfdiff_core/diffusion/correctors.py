"""Predictor–corrector samplers in the one sampler signature (see samplers.py):

    sampler(model, x, process, *, steps, guidance=None, callback=None, generator=None, **settings) -> SlabBatch

Both take an Euler–Maruyama step of the reverse SDE as the predictor (`steps.em_step`) and follow it with
corrector steps at the new time t_next; `callback(i, t_next, x)` sees the state after the correctors.

* `predictor_corrector`: Langevin MCMC on p_{t_next} (Song et al. 2021, Algorithm 4/5), `corrector_steps`
  steps per predictor step with the signal-to-noise-ratio step size ε = 2 snr² / mean(s²) (mean over the
  batch's movable coordinates, i.e. (snr ‖ξ‖ / ‖s‖)² with E‖ξ‖² in place of the draw):
  x ← x + ε s + √(2ε) ξ. In-plane positions are wrapped; z is
  reflected at the box walls, which keeps p_t restricted to the box stationary (the score the model learns
  is that of the truncated kernel's marginal, exact inside the box). Guidance tilts the target: its rate r
  enters as the score r / g² it stands for in the predictor (g² = βα²L² in-plane, βL² in z).
* `force_field_corrector`: once t_next ≤ `t_max`, `corrector_steps` small steps along the MLFF forces of the
  denoiser output (as ForceFieldGuidance uses them): x ← confine(x + cap(step·F)), a few steepest-descent
  steps per predictor step at the end of the trajectory, where the structure is nearly formed.

Each corrector step is one model evaluation: at `corrector_steps` = 1 the PC sampler costs 2·steps
evaluations. Masked atoms never move.
"""

from __future__ import annotations

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance, cap_norm
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion
from surfdiff_core.diffusion.steps import em_step, model_at, run_steps
from surfdiff_core.geometry.batch import SlabBatch


def reflect(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """z folded into [lo, hi] by reflection at both walls (any number of times)."""
    w = hi - lo
    y = torch.remainder(z - lo, 2 * w)
    return lo + torch.where(y > w, 2 * w - y, y)


def langevin_step(
    model: DenoiserFn,
    x: SlabBatch,
    pos: torch.Tensor,
    t: float,
    dt: float,
    process: SurfaceDiffusion,
    geo: SlabGeometry,
    guidance: Guidance | None,
    generator: torch.Generator | None,
    snr: float,
) -> torch.Tensor:
    """One Langevin corrector step at time t (one model evaluation); dt is the predictor's step (guidance
    rates are per unit time of that step)."""
    sch, L = process.schedule, process.length_scale
    xb, tvec, out = model_at(model, x, pos, t, guidance is not None and guidance.needs_forces)
    score = -out.eps / (sch.sigma(t) * L)
    if guidance is not None:
        b, a = sch.beta(t), sch.alpha(t)
        g2 = pos.new_tensor([b * a * a * L * L, b * a * a * L * L, b * L * L])
        score = score + guidance(xb, tvec, out, dt=dt) / g2
    xi = torch.randn(pos.shape, generator=generator, device=pos.device, dtype=pos.dtype)
    # One step size for the batch, from mean squares over its movable coordinates (Song et al.'s code also
    # averages the norms over the batch): a per-structure ε(x) ∝ 1/‖s(x)‖² is larger near the modes, which
    # biases the chain outward (~10 % in std for 8-atom structures); E[ξ²] = 1 replaces the sampled norm.
    if not bool(geo.movable.any()):
        return pos
    eps = 2.0 * snr**2 / (score[geo.movable] ** 2).mean().clamp_min(1e-12)
    det = pos + eps * score
    # deterministic part clamped into the box first (as in EM), then the noise reflected at the walls
    z_det = torch.minimum(torch.maximum(det[:, 2], geo.z_lo), geo.z_hi)
    new = torch.cat([det[:, :2], z_det[:, None]], dim=1) + torch.sqrt(2.0 * eps) * xi
    new = geo.wrap(torch.cat([new[:, :2], reflect(new[:, 2], geo.z_lo, geo.z_hi)[:, None]], dim=1))
    return torch.where(geo.movable[:, None], new, pos)


@torch.no_grad()
def predictor_corrector(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 250,
    guidance: Guidance | None = None,
    callback=None,
    generator: torch.Generator | None = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
) -> SlabBatch:
    """Euler–Maruyama predictor + `corrector_steps` Langevin corrector steps at each new time
    ((1 + corrector_steps)·steps model evaluations). snr 0.16 is Song et al.'s value for VP models."""
    if corrector_steps < 0 or snr <= 0:
        raise ValueError("predictor_corrector needs corrector_steps >= 0 and snr > 0")
    geo = process.geometry(x)

    def step(pos: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        pos = em_step(model, x, pos, t, t_next, process, geo, guidance, generator)
        for _ in range(corrector_steps):
            pos = langevin_step(model, x, pos, t_next, t - t_next, process, geo, guidance, generator, snr)
        return pos

    return x.with_positions(run_steps(x, process, geo, steps, step, callback))


def force_step(model: DenoiserFn, x: SlabBatch, pos: torch.Tensor, t: float, geo: SlabGeometry,
               step: float, max_displacement: float | None) -> torch.Tensor:
    """One capped steepest-descent step along the denoiser's MLFF forces at time t (one evaluation)."""
    _, _, out = model_at(model, x, pos, t, True)
    if out.forces is None:
        raise ValueError("the force-field corrector needs a model that returns forces")
    new = geo.confine(pos + cap_norm(step * out.forces, max_displacement))
    return torch.where(geo.movable[:, None], new, pos)


@torch.no_grad()
def force_field_corrector(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 500,
    guidance: Guidance | None = None,
    callback=None,
    generator: torch.Generator | None = None,
    corrector_steps: int = 1,
    t_max: float = 0.1,
    step: float = 0.01,
    max_displacement: float | None = 0.1,
) -> SlabBatch:
    """Euler–Maruyama predictor; once t_next ≤ t_max, `corrector_steps` force steps after each predictor step
    (displacement step·F in Å for forces F in eV/Å, capped per atom at max_displacement Å)."""
    if corrector_steps < 0 or step < 0 or not 0 <= t_max <= 1:
        raise ValueError("force_field_corrector needs corrector_steps >= 0, step >= 0 and t_max in [0, 1]")
    geo = process.geometry(x)

    def predict_then_correct(pos: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        pos = em_step(model, x, pos, t, t_next, process, geo, guidance, generator)
        for _ in range(corrector_steps if t_next <= t_max else 0):
            pos = force_step(model, x, pos, t_next, geo, step, max_displacement)
        return pos

    return x.with_positions(run_steps(x, process, geo, steps, predict_then_correct, callback))
