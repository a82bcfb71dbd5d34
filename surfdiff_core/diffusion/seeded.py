"""Seeded exploration: denoise a given structure noised to an intermediate time t0 instead of a prior draw.

    x = noise_to(process, seed_batch, t0, generator)          # the process's forward kernel at t0
    x = sampler(model, x, start_at(process, t0), steps=...)   # any sampler of the one signature

`start_at` returns the same process whose sampling time grid starts at t0 instead of 1 (the samplers read
their times from `process.time_grid`), so every sampler, guidance and the inpainting wrapper work unchanged.
Small t0 stays near the seed; t0 → 1 forgets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.process import SurfaceDiffusion
from surfdiff_core.geometry.batch import SlabBatch


def _grid(t_start: float, t_min: float, steps: int, power: float) -> list[float]:
    if steps < 1:
        raise ValueError("steps must be >= 1")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) ** power
    return (t_min + (t_start - t_min) * u).tolist()


@dataclass(frozen=True)
class SeededDiffusion(SurfaceDiffusion):
    """The diffusion with sampling times t_start = t_0 > … > t_steps = t_min."""

    t_start: float = 1.0

    def time_grid(self, steps: int, power: float = 1.0) -> list[float]:
        return _grid(self.t_start, self.t_min, steps, power)


@dataclass(frozen=True)
class SeededFlow(SurfaceFlow):
    """Flow matching with sampling times t_start = t_0 > … > t_steps = t_min."""

    t_start: float = 1.0

    def time_grid(self, steps: int) -> list[float]:
        return _grid(self.t_start, self.t_min, steps, 1.0)


def start_at(process: SurfaceDiffusion | SurfaceFlow, t0: float) -> SeededDiffusion | SeededFlow:
    """`process` with its sampling time grid starting at t0 (t_min < t0 <= 1)."""
    if not process.t_min < t0 <= 1.0:
        raise ValueError(f"t0 must lie in ({process.t_min}, 1], got {t0}")
    if isinstance(process, SurfaceFlow):
        return SeededFlow(length_scale=process.length_scale, t_min=process.t_min, t_start=t0)
    return SeededDiffusion(schedule=process.schedule, length_scale=process.length_scale, t_min=process.t_min,
                           t_start=t0)


def seeded_steps(steps: int, t0: float, t_min: float) -> int:
    """Steps from t0 at the step size a full run of `steps` steps from t = 1 would take."""
    return max(1, math.ceil(steps * (t0 - t_min) / (1.0 - t_min) - 1e-9))


def noise_to(process: SurfaceDiffusion | SurfaceFlow, seed: SlabBatch, t0: float,
             generator: torch.Generator | None = None) -> SlabBatch:
    """A draw of the forward kernel at t0 from the seed structures (masked atoms untouched)."""
    return process.perturb(seed, t0, generator)[0]
