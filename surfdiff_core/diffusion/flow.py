"""Flow matching on surface slabs: straight paths from the uniform box prior to the data, periodic in-plane.

Conventions (the diffusion's time direction, so the denoiser, its time embedding and the samplers' callbacks
are shared):

* t = 0 is data x0, t = 1 the prior x1 ~ uniform over the box (cell × [z_min, z_max]). The path is
  x_t = x0 + t·d with d = x1 − x0, taken as the shortest periodic image in-plane (a geodesic on the torus)
  and plainly along z; a straight segment between two points of the box stays in the box, so z needs no
  truncation.
* The model's vector head predicts u = d / L (L = `length_scale`, so targets are of order one): the velocity
  dx/dt = L·u of the path. Sampling integrates it from t = 1 to t = t_min: x ← x − Δt·L·u, wrapped in-plane
  and clamped into the box, deterministic given the prior draw.
* The training loss is the mean over movable atoms of ‖u_pred − d/L‖²; masked atoms are never moved and
  their target is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, Guidance
from surfdiff_core.diffusion.process import SlabGeometry, movable_mse, uniform_box_prior
from surfdiff_core.geometry.batch import SlabBatch


@dataclass(frozen=True)
class SurfaceFlow:
    length_scale: float = 10.0
    t_min: float = 0.0

    def __post_init__(self) -> None:
        if self.length_scale <= 0:
            raise ValueError("length_scale must be positive")
        if not 0 <= self.t_min < 1:
            raise ValueError("t_min must be in [0, 1)")

    def geometry(self, batch: SlabBatch) -> SlabGeometry:
        return SlabGeometry.from_batch(batch)

    def time_grid(self, steps: int) -> list[float]:
        """Sampling times 1 = t_0 > … > t_steps = t_min, uniform."""
        if steps < 1:
            raise ValueError("steps must be >= 1")
        u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return (self.t_min + (1.0 - self.t_min) * u).tolist()

    def sample_prior(self, batch: SlabBatch, generator: torch.Generator | None = None) -> SlabBatch:
        """Movable atoms uniform over the box; masked atoms where they are."""
        return uniform_box_prior(batch, generator)

    def displacement(self, x0: torch.Tensor, x1: torch.Tensor, geo: SlabGeometry) -> torch.Tensor:
        """d = x1 − x0: the shortest periodic image in-plane, plain along z; zero on masked atoms."""
        d = x1 - x0
        d = torch.cat([geo.minimum_image(d[:, :2]), d[:, 2:]], dim=1)
        return torch.where(geo.movable[:, None], d, torch.zeros_like(d))

    def perturb(self, batch: SlabBatch, t: torch.Tensor | float,
                generator: torch.Generator | None = None) -> tuple[SlabBatch, torch.Tensor]:
        """x_t on the path from x0 = batch to a prior draw, at per-structure times t [B]; returns (x_t, d / L)."""
        geo = self.geometry(batch)
        x0 = geo.confine(batch.positions)
        x1 = self.sample_prior(batch.with_positions(x0), generator).positions
        d = self.displacement(x0, x1, geo)
        tt = torch.as_tensor(t, device=x0.device, dtype=x0.dtype)
        tb = (tt.expand(batch.n_structures) if tt.ndim == 0 else tt)[batch.batch]
        pos_t = geo.confine(x0 + tb[:, None] * d)  # in the box already; confine wraps in-plane
        return batch.with_positions(pos_t), d / self.length_scale

    def training_loss(self, pred: torch.Tensor, target: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
        """Mean over movable atoms of ‖pred − target‖²."""
        return movable_mse(pred, target, batch)

    def velocity(self, u: torch.Tensor) -> torch.Tensor:
        """dx/dt (Å per unit time, toward the prior) from the model's output u."""
        return self.length_scale * u


@torch.no_grad()
def flow_euler(
    model: DenoiserFn,
    x: SlabBatch,
    process: SurfaceFlow,
    *,
    steps: int = 100,
    guidance: Guidance | None = None,
    callback=None,
    generator: torch.Generator | None = None,
) -> SlabBatch:
    """Euler integration of the learned flow from t = 1 to t_min (one model evaluation per step), with
    guidance added to the velocity as in the diffusion samplers. `generator` is unused (shared signature)."""
    del generator
    if not isinstance(process, SurfaceFlow):
        raise TypeError("the flow sampler needs a flow-matching model (model.generative: flow)")
    geo = process.geometry(x)
    ts = process.time_grid(steps)
    pos = geo.confine(x.positions)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next
        xb = x.with_positions(pos)
        tvec = torch.full((x.n_structures,), t, device=pos.device, dtype=pos.dtype)
        out = model(xb, tvec, with_forces=guidance is not None and guidance.needs_forces)
        v = -process.velocity(out.eps)  # per unit of decreasing time
        if guidance is not None:
            v = v + guidance(xb, tvec, out, dt=dt)
        v = torch.where(geo.movable[:, None], v, torch.zeros_like(v))
        pos = geo.confine(pos + dt * v)
        if callback is not None:
            callback(i, t_next, x.with_positions(pos))
    return x.with_positions(pos)
