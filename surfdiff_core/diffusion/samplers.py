"""Reverse-time samplers for `SurfaceDiffusion`: Euler–Maruyama on the reverse SDE, a Heun
probability-flow ODE and deterministic DDIM steps, with one shared signature:

    sampler(model, x, process, *, steps, guidance=None, callback=None, generator=None) -> SlabBatch

`SAMPLERS` also holds the predictor–corrector samplers of correctors.py; samplers with settings of their own
(corrector steps, the known atoms of inpaint.py) take them as extra keywords, bound with functools.partial.
Single steps shared by them live in steps.py; seeded.py starts any of them from an intermediate time.

* `model(batch, t, *, with_forces) -> DenoiserOutput`, t [B]; eps is unit-variance noise, so the score is
  −eps / (σ_t L). The sampler asks for forces only when the guidance needs them (one pass per
  evaluation). Samplers run under torch.no_grad(); a model that computes forces by autograd must enable
  it internally (torch.enable_grad), as `SurfaceModel.denoise` does.
* `x` is the state at t = 1 (the first time of `process.time_grid`), normally
  `process.sample_prior(template, generator)`; it is wrapped and clamped into the box first. Masked atoms
  are never moved.
* Time runs on a uniform grid from 1 to t_min (`process.time_grid`). `callback(i, t_next, x)` is called
  after each step i = 0 … steps−1 with the new state.
* Reverse dynamics, per unit of decreasing time (β, α, σ at the current t, score s = −eps/(σL)):
    in-plane  dx = β α² L² s dt + α √(β dt) L ξ
              (g² = β α² L² is the variance rate of the in-plane kernel N(x0, σ_t² L²); the VP value
              β L² would belong to a kernel of variance L² ∫β, inconsistent with the eps the model learns)
    z         dz = [−u(z) + ½ β L² s] dt + √(β dt) L ξ,  ξ drawn truncated to the box around the
              deterministic update (itself clamped into the box first).
  u(z) is the forward probability-flow velocity of the truncated z kernel
  (`SurfaceDiffusion.z_flow_velocity`): away from the walls it equals −½β(z − z_c) − ½βL² s, so the
  z drift is the standard ½β(z − z_c) + βL² s there; near the walls it carries the truncation's
  boundary term, which makes the probability flux through the walls vanish. (With the plain VP drift
  the ODE contracts the uniform prior toward the box centre, and EM under-disperses z at intermediate
  t.) The probability-flow ODE uses the velocity −u in z and ½ of the in-plane score term, no noise.
  Every EM step, the last included, adds noise (at t_min it is ~0.05 Å for 500 steps; dropping it
  biases the final spread). Guidance adds rate·dt to the deterministic part. In-plane positions are
  wrapped after every step; the final state is at t_min.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from surfdiff_core.diffusion.correctors import force_field_corrector, predictor_corrector
from surfdiff_core.diffusion.flow import SurfaceFlow, flow_euler
from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance
from surfdiff_core.diffusion.process import SurfaceDiffusion
from surfdiff_core.diffusion.steps import em_step, reverse_drift, run_steps
from surfdiff_core.geometry.batch import SlabBatch

Callback = Callable[[int, float, SlabBatch], None]


class Sampler(Protocol):
    def __call__(
        self,
        model: DenoiserFn,
        x: SlabBatch,
        process: SurfaceDiffusion | SurfaceFlow,
        *,
        steps: int,
        guidance: Guidance | None = None,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> SlabBatch: ...


@torch.no_grad()
def euler_maruyama(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 500,
    guidance: Guidance | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> SlabBatch:
    """Euler–Maruyama integration of the reverse SDE (paper eq. 2 plus guidance eq. 3)."""
    geo = process.geometry(x)

    def step(pos: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        return em_step(model, x, pos, t, t_next, process, geo, guidance, generator)

    return x.with_positions(run_steps(x, process, geo, steps, step, callback))


@torch.no_grad()
def probability_flow_ode(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 100,
    guidance: Guidance | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    time_power: float = 2.0,
) -> SlabBatch:
    """Heun (2nd-order) integration of the probability-flow ODE; deterministic given x.

    Two model evaluations per step. The time grid is `process.time_grid(steps, time_power)`: quadratic
    by default, since with few steps the uniform grid under-resolves the stiff end near t = 0.
    `generator` is unused (kept for the shared signature).
    """
    del generator
    geo = process.geometry(x)
    ts = process.time_grid(steps, power=time_power)
    pos = geo.confine(x.positions)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next
        v1 = reverse_drift(model, x, pos, t, dt, process, geo, guidance, True)
        pred = geo.confine(pos + dt * v1)
        v2 = reverse_drift(model, x, pred, t_next, dt, process, geo, guidance, True)
        pos = geo.confine(pos + 0.5 * dt * (v1 + v2))
        if callback is not None:
            callback(i, t_next, x.with_positions(pos))
    return x.with_positions(pos)


def _quantile_map(
    z: torch.Tensor, m_t: torch.Tensor, s_t: float, m_s: torch.Tensor, s_s: float, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """z's quantile in TN(m_t, s_t²; [lo, hi]) carried to the same quantile of TN(m_s, s_s²; [lo, hi])."""
    zz, mt, ms, lo, hi = (v.double() for v in (z, m_t, m_s, lo, hi))
    cdf_lo, cdf_hi = torch.special.ndtr((lo - mt) / s_t), torch.special.ndtr((hi - mt) / s_t)
    mass_t = cdf_hi - cdf_lo
    u = ((torch.special.ndtr((zz - mt) / s_t) - cdf_lo) / mass_t.clamp_min(1e-300)).clamp(0.0, 1.0)
    new_lo, new_hi = torch.special.ndtr((lo - ms) / s_s), torch.special.ndtr((hi - ms) / s_s)
    q = (new_lo + u * (new_hi - new_lo)).clamp(1e-15, 1.0 - 1e-15)
    out = ms + s_s * torch.special.ndtri(q)
    # Both kernels deep in one tail (mass underflows): fall back to the Gaussian map, clamped into the box.
    degenerate = (mass_t < 1e-12) | ((new_hi - new_lo) < 1e-12)
    out = torch.where(degenerate, ms + (s_s / s_t) * (zz - mt), out)
    return torch.minimum(torch.maximum(out, lo), hi).to(z.dtype)


@torch.no_grad()
def ddim(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceDiffusion,
    *,
    steps: int = 50,
    guidance: Guidance | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    time_power: float = 2.0,
) -> SlabBatch:
    """Deterministic DDIM steps (one model evaluation each), for large steps with few evaluations.

    Each step predicts the clean structure from eps and moves every coordinate to the same quantile of
    the kernel at the next time, given that prediction: in-plane x̂0 + σ_s L ε̂ (the VE kernel,
    ε̂ kept), in z the quantile map between the truncated kernels TN(m_t, ·) → TN(m_s, ·) on the box, with
    m_t = z − σ_t L ε̂_z (the kernel-mean estimate the ODE uses) and m_s = z_c + (α_s/α_t)(m_t − z_c).
    With the exact posterior mean this is the DDIM (η = 0) update; guidance adds rate·dt. Time grid
    as `probability_flow_ode`. `generator` is unused (kept for the shared signature).
    """
    del generator
    geo = process.geometry(x)
    sch, L = process.schedule, process.length_scale
    ts = process.time_grid(steps, power=time_power)
    pos = geo.confine(x.positions)
    mov = geo.movable[:, None]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next
        xb = x.with_positions(pos)
        tvec = torch.full((x.n_structures,), t, device=pos.device, dtype=pos.dtype)
        out = model(xb, tvec, with_forces=guidance is not None and guidance.needs_forces)
        s_t, s_s = sch.sigma(t) * L, sch.sigma(t_next) * L
        xy = pos[:, :2] - (s_t - s_s) * out.eps[:, :2]
        m_t = pos[:, 2] - s_t * out.eps[:, 2]
        m_s = geo.z_center + (sch.alpha(t_next) / sch.alpha(t)) * (m_t - geo.z_center)
        z = _quantile_map(pos[:, 2], m_t, s_t, m_s, s_s, geo.z_lo, geo.z_hi)
        new = torch.cat([xy, z[:, None]], dim=1)
        if guidance is not None:
            new = new + dt * guidance(xb, tvec, out, dt=dt)
        pos = torch.where(mov, geo.confine(new), pos)
        if callback is not None:
            callback(i, t_next, x.with_positions(pos))
    return x.with_positions(pos)


SAMPLERS: dict[str, Sampler] = {"em": euler_maruyama, "ode": probability_flow_ode, "ddim": ddim,
                                 "flow": flow_euler, "pc": predictor_corrector, "ffc": force_field_corrector}
