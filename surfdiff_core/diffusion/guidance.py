"""Force-field guidance during sampling (Rønne et al. 2024, eq. 3).

Guidance protocol: a guidance object returns an extra displacement RATE in Å per unit time for every
atom; the sampler multiplies it by its step Δt and adds it to the deterministic part of the update
(masked atoms are ignored). Guidance that needs MLFF forces sets `needs_forces = True`, and the sampler
then asks the model for eps and forces in one pass.

The sampler passes its step `dt` to the guidance as a keyword. That is how `ForceFieldGuidance` is
configured by the paper's ηΔt (`eta_dt`, Å²/eV = Å/(eV/Å)) rather than by η: η = eta_dt / Δt, so the
displacement per step, τ(t)·F·Δt = eta_dt·(1 − t)·F, does not depend on the number of steps, exactly
as the paper fixes ηΔt = 0.001 Å²/eV.

The short MLFF relaxation that follows sampling lives with the other relaxers (relax/mlff.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch


class DenoiserFn(Protocol):
    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput: ...


@runtime_checkable
class Guidance(Protocol):
    needs_forces: bool

    def __call__(self, batch: SlabBatch, t: torch.Tensor, out: DenoiserOutput, *, dt: float) -> torch.Tensor:
        """Extra displacement rate [N,3] (Å per unit time) at per-structure times t [B]."""
        ...


def cap_norm(v: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Scale rows of v down to norm ≤ cap (per atom)."""
    if cap is None:
        return v
    norm = torch.linalg.norm(v, dim=-1, keepdim=True)
    return v * torch.clamp(cap / norm.clamp_min(1e-12), max=1.0)


@dataclass(frozen=True)
class ForceFieldGuidance:
    """τ(t)·F with τ(t) = η(1 − t), η = eta_dt / Δt (paper eq. 3).

    max_displacement (Å, optional) caps the per-atom guidance displacement per step, a safeguard against
    the huge MLFF forces of overlapping atoms late in sampling; None (default) follows the paper.
    """

    eta_dt: float = 1e-3
    max_displacement: float | None = None
    needs_forces: bool = field(default=True, init=False)

    def __call__(self, batch: SlabBatch, t: torch.Tensor, out: DenoiserOutput, *, dt: float) -> torch.Tensor:
        if out.forces is None:
            raise ValueError("ForceFieldGuidance needs forces: call the model with with_forces=True")
        if dt <= 0:
            raise ValueError("dt must be positive")
        tau_dt = self.eta_dt * (1.0 - t)[batch.batch, None]  # τ(t)·Δt per atom
        step = cap_norm(tau_dt * out.forces, self.max_displacement)
        return torch.where(batch.movable[:, None], step / dt, torch.zeros_like(step))
