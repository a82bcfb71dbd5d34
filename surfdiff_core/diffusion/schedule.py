"""Noise schedule of the variance-preserving (VP) SDE used for surface diffusion (Rønne et al. 2024, eq. 1).

β(t) = β_min + t (β_max − β_min) on t ∈ [0, 1] (paper: β_min = 0.01, β_max = 3).
∫₀ᵗ β = β_min t + ½ t² (β_max − β_min),  α_t = exp(−½ ∫₀ᵗ β),  σ_t² = 1 − α_t².

The schedule is dimensionless: the process multiplies σ_t by a global length scale L (Å) to get the
kernel std. The functions are pure and accept floats or tensors (any shape), so they can be used from
the process, the samplers and the tests alike; `VPSchedule` just binds the two constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Time = torch.Tensor | float


def beta(t: Time, beta_min: float = 0.01, beta_max: float = 3.0) -> Time:
    """β(t), the instantaneous noise rate."""
    return beta_min + t * (beta_max - beta_min)


def int_beta(t: Time, beta_min: float = 0.01, beta_max: float = 3.0) -> Time:
    """∫₀ᵗ β(s) ds."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t * t


def alpha(t: Time, beta_min: float = 0.01, beta_max: float = 3.0) -> Time:
    """α_t = exp(−½ ∫β): the VP mean-shrinkage factor (1 at t=0)."""
    ib = int_beta(t, beta_min, beta_max)
    return torch.exp(-0.5 * ib) if isinstance(ib, torch.Tensor) else math.exp(-0.5 * ib)


def sigma(t: Time, beta_min: float = 0.01, beta_max: float = 3.0) -> Time:
    """σ_t = sqrt(1 − α_t²), written with expm1 so that small t keeps full relative precision."""
    ib = int_beta(t, beta_min, beta_max)
    if isinstance(ib, torch.Tensor):
        return torch.sqrt(-torch.expm1(-ib))
    return math.sqrt(-math.expm1(-ib))


@dataclass(frozen=True)
class VPSchedule:
    beta_min: float = 0.01
    beta_max: float = 3.0

    def __post_init__(self) -> None:
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def beta(self, t: Time) -> Time:
        return beta(t, self.beta_min, self.beta_max)

    def int_beta(self, t: Time) -> Time:
        return int_beta(t, self.beta_min, self.beta_max)

    def alpha(self, t: Time) -> Time:
        return alpha(t, self.beta_min, self.beta_max)

    def sigma(self, t: Time) -> Time:
        return sigma(t, self.beta_min, self.beta_max)
