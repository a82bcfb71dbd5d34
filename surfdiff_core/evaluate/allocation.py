"""How one round's oracle labels are spread over the targets of a sweep.

`uniform`: the same number for every target (the baseline). `envelope`: the targets that decide the phase
diagram first. Each target's best candidate so far (its lowest oracle label, or its best sample's MLFF energy)
gives a γ(Δμ) line; its excess is the least energy (eV, γ × area) by which the line lies above the lower
envelope of all lines and the clean surface over the Δμ range: 0 for a target that is stable somewhere. A
target may still be on the true envelope if its estimate is too high by its excess, which is likely when the
excess is small against its uncertainty σ (the committee's spread, at least the evaluation's tolerance):
its weight is exp(−excess/σ). Every target keeps a floor of one label per round (the budget allowing), so none
is abandoned on one round's estimate; the rest goes by weight, in whole labels (largest remainder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from surfdiff_core.evaluate.phase import PhaseLine, clean_line, phase_diagram


def uniform_quotas(total: int, n: int) -> list[int]:
    """`total` labels over `n` targets as evenly as possible, the first targets taking the remainder."""
    if n <= 0:
        return []
    base, extra = divmod(max(0, total), n)
    return [base + (i < extra) for i in range(n)]


def envelope_excess(lines: Sequence[PhaseLine], dmu_range: tuple[float, float]) -> list[float]:
    """Per line, the least γ (eV/Å²) it lies above the lower envelope of all lines and the clean surface over
    `dmu_range`; 0 where the line is on it. γ_line − envelope is convex and piecewise linear in Δμ, so its
    minimum is at an end of the range or a breakpoint of the envelope."""
    candidates = [*lines, clean_line()]
    points = {float(dmu_range[0]), float(dmu_range[1])}
    for seg in phase_diagram(candidates, dmu_range):
        points |= {seg.dmu_min, seg.dmu_max}
    xs = np.array(sorted(points))
    envelope = np.min([ln.gamma(xs) for ln in candidates], axis=0)
    return [float(max(0.0, np.min(ln.gamma(xs) - envelope))) for ln in lines]


def envelope_weights(excess_eV: Sequence[float], sigma_eV: Sequence[float]) -> list[float]:
    """exp(−excess/σ) per target: 1 on the envelope, small when far above it against its uncertainty."""
    return [float(np.exp(-max(0.0, e) / s)) for e, s in zip(excess_eV, sigma_eV, strict=True)]


def weighted_quotas(total: int, weights: Sequence[float], floor: int = 1) -> list[int]:
    """`total` whole labels: `floor` each while the total allows (highest weights first), the rest in proportion
    to `weights` by largest remainder (ties: the earlier target). Sums to `total` exactly."""
    n = len(weights)
    if n == 0:
        return []
    total = max(0, total)
    w = np.asarray(weights, float)
    order = sorted(range(n), key=lambda i: (-w[i], i))
    quotas = [0] * n
    for i in order:  # the floor, best weights first when the total cannot cover it for all
        take = min(floor, total - sum(quotas))
        if take <= 0:
            break
        quotas[i] = take
    rest = total - sum(quotas)
    if rest <= 0:
        return quotas
    share = w / w.sum() * rest if w.sum() > 0 else np.full(n, rest / n)
    whole = np.floor(share).astype(int)
    for i in range(n):
        quotas[i] += int(whole[i])
    left = rest - int(whole.sum())
    for i in sorted(range(n), key=lambda i: (-(share[i] - whole[i]), i))[:left]:
        quotas[i] += 1
    return quotas


def envelope_quotas(total: int, lines: Sequence[PhaseLine], areas: Sequence[float], sigma_eV: Sequence[float],
                    dmu_range: tuple[float, float], floor: int = 1) -> tuple[list[int], list[float]]:
    """(labels per target, excess in eV per target) for the `envelope` strategy; `lines[i]` is target i's best
    candidate so far and `areas[i]` its cell's surface area (Å²)."""
    excess = [e * a for e, a in zip(envelope_excess(lines, dmu_range), areas, strict=True)]
    return weighted_quotas(total, envelope_weights(excess, sigma_eV), floor), excess
