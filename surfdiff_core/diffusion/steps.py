"""Single reverse-time steps shared by the samplers (samplers.py, correctors.py, inpaint.py); the dynamics
and conventions are those of the samplers' module docstring."""

from __future__ import annotations

import math

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion, truncated_normal
from surfdiff_core.geometry.batch import SlabBatch


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
    xb = x.with_positions(pos)
    tvec = torch.full((x.n_structures,), t, device=pos.device, dtype=pos.dtype)
    out = model(xb, tvec, with_forces=guidance is not None and guidance.needs_forces)
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
