"""Single reverse-time steps shared by the samplers (samplers.py, correctors.py, inpaint.py); the dynamics
and conventions are those of the samplers' module docstring."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion, truncated_normal
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch

StepFn = Callable[[torch.Tensor, float, float], torch.Tensor]  # (positions, t, t_next) -> new positions


def model_at(model: DenoiserFn, x: SlabBatch, pos: torch.Tensor, t: float,
             with_forces: bool) -> tuple[SlabBatch, torch.Tensor, DenoiserOutput]:
    """(batch at `pos`, its time vector, the model's output there): one model evaluation."""
    xb = x.with_positions(pos)
    tvec = torch.full((x.n_structures,), t, device=pos.device, dtype=pos.dtype)
    return xb, tvec, model(xb, tvec, with_forces=with_forces)


def run_steps(x: SlabBatch, process: SurfaceDiffusion, geo: SlabGeometry, steps: int, step: StepFn,
              callback: Callable[[int, float, SlabBatch], None] | None,
              pos: torch.Tensor | None = None) -> torch.Tensor:
    """The reverse-time loop of the samplers built on single steps: over `process.time_grid(steps)`,
    pos <- step(pos, t, t_next), then `callback(i, t_next, batch)`; starts from the confined `x` (or `pos`)."""
    ts = process.time_grid(steps)
    pos = geo.confine(x.positions) if pos is None else pos
    for i in range(steps):
        pos = step(pos, ts[i], ts[i + 1])
        if callback is not None:
            callback(i, ts[i + 1], x.with_positions(pos))
    return pos


def reverse_drift(
    model: DenoiserFn,
    x: SlabBatch,
    pos: torch.Tensor,
    t: float,
    dt: float,
    process: SurfaceDiffusion,
    geo: SlabGeometry,
    guidance: Guidance | None,
    ode: bool,
) -> torch.Tensor:
    """Deterministic reverse-time velocity [N,3] (Å per unit of decreasing time) at time t:
    the reverse-SDE drift, or (ode=True) the probability-flow velocity."""
    sch, L = process.schedule, process.length_scale
    xb, tvec, out = model_at(model, x, pos, t, guidance is not None and guidance.needs_forces)
    b, a, s = sch.beta(t), sch.alpha(t), sch.sigma(t)
    score = -out.eps / (s * L)
    # Reverse SDE = probability flow + Langevin term ½g²·score (+ noise g dW̄, added by the caller).
    v_xy = (0.5 if ode else 1.0) * b * a * a * L * L * score[:, :2]
    v_z = -process.z_flow_velocity(pos[:, 2], out.eps[:, 2], t, geo)
    if not ode:
        v_z = v_z + 0.5 * b * L * L * score[:, 2]
    v = torch.cat([v_xy, v_z[:, None]], dim=1)
    if guidance is not None:
        v = v + guidance(xb, tvec, out, dt=dt)
    return torch.where(geo.movable[:, None], v, torch.zeros_like(v))


def em_step(
    model: DenoiserFn,
    x: SlabBatch,
    pos: torch.Tensor,
    t: float,
    t_next: float,
    process: SurfaceDiffusion,
    geo: SlabGeometry,
    guidance: Guidance | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One Euler–Maruyama step of the reverse SDE from t to t_next (one model evaluation): the new
    positions [N,3], wrapped in-plane, z drawn truncated to the box, masked atoms where they were.
    Shared by `euler_maruyama` and the samplers built on it (correctors, inpainting)."""
    sch, L = process.schedule, process.length_scale
    dt = t - t_next
    det = pos + dt * reverse_drift(model, x, pos, t, dt, process, geo, guidance, False)
    z_det = torch.minimum(torch.maximum(det[:, 2], geo.z_lo), geo.z_hi)
    b, a = sch.beta(t), sch.alpha(t)
    noise_std = math.sqrt(b * dt) * L
    xi = torch.randn((pos.shape[0], 2), generator=generator, device=pos.device, dtype=pos.dtype)
    xy = det[:, :2] + a * noise_std * xi
    z = truncated_normal(z_det, pos.new_tensor(noise_std), geo.z_lo, geo.z_hi, generator)
    new = geo.wrap(torch.cat([xy, z[:, None]], dim=1))
    return torch.where(geo.movable[:, None], new, pos)
