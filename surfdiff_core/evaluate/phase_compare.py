"""What each arm's sweep concludes about the surface phase diagram, against the reference envelope.

Three lower envelopes of γ(Δμ) over every composition and cell of a sweep (γ per surface area, as in
surfdiff_core.evaluate.phase), each with the clean surface:
- reference: per target the lowest energy either arm found (the best estimate of the truth from everything
  computed);
- surfdiff: per target the lowest energy the generative arm found (its active-learning labels and evaluation
  relaxations that can count);
- RSS at the same all-in budget: the generative arm's total all-in cost B (`sweep_budget`) spent uniformly over
  the targets; per target the expected best of the k_t relaxations its share buys (`rss_shares`), no line
  where k_t = 0.

A phase is a line label ("Ag12O8 p(4x4)"); an arm *misses* a phase when the phase is on the reference envelope
somewhere in the Δμ range but nowhere on the arm's own envelope. Pure functions of plain numbers: the stage
layer (surfdiff_core.stages.evaluate_report) fetches energies and costs from the store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from surfdiff_core.evaluate.budget import expected_best_curve
from surfdiff_core.evaluate.cost import HEADLINE
from surfdiff_core.evaluate.phase import PhaseLine, PhaseSegment, clean_line, phase_diagram, window_text

ARMS: dict[str, str] = {"surfdiff": "surfdiff", "rss": "RSS at the same budget"}
_MIN_WIDTH = 1e-9  # eV: narrower Δμ windows are rounding between identical breakpoints, not a phase


@dataclass(frozen=True)
class TargetPhase:
    """One target's plain numbers for the envelopes."""

    label: str  # the phase's name, "composition cell"
    line: PhaseLine | None  # its reference line (the best of both arms); None when neither arm found a minimum
    reference_energy: float | None  # eV, the energy that line was made from
    area: float  # Å², of the covered face
    generative_best: float | None  # eV, lowest energy of the generative arm that can count
    rss_energies: tuple[float, ...]  # eV, RSS relaxations in the cell that can count (finished, in the box)
    rss_cost: float  # atom-weighted force calls of every RSS relaxation in the cell, lost ones included


def best_energy(energies: Sequence[float | None]) -> float | None:
    """Lowest finite entry (NaN, or None from JSON: a relaxation spent that cannot count); None when none."""
    finite = [float(e) for e in energies if e is not None and np.isfinite(e)]
    return min(finite) if finite else None


def shifted_line(line: PhaseLine, from_energy: float, to_energy: float, area: float) -> PhaseLine:
    """The same phase at another total energy: γ moves by ΔE / A at every Δμ (references and counts unchanged)."""
    return PhaseLine(line.label, line.intercept + (to_energy - from_energy) / area, line.slope,
                     line.composition, line.cell)


def arm_lines(targets: Sequence[TargetPhase], energies: Sequence[float | None]) -> list[PhaseLine]:
    """An arm's lines: each target with a reference line and an energy in this arm, plus the clean surface."""
    out = [shifted_line(t.line, t.reference_energy, e, t.area)  # type: ignore[arg-type]
           for t, e in zip(targets, energies, strict=True) if t.line is not None and e is not None]
    return [*out, clean_line()]


# ---- RSS at the generative arm's budget ---------------------------------------------------------------------
def sweep_budget(all_in: Mapping[str, Any], evaluation: float, unit: str = HEADLINE) -> dict[str, float]:
    """B, the generative arm's TOTAL all-in cost of the sweep in `unit` (atom-weighted force calls by default):
    the training data (`all_in["training"]`: every oracle relaxation of the training cell the model's data came
    from) + every active-learning label and single point (`all_in["active_learning"]`) + `evaluation`, the
    cost of every evaluation relaxation of every target (lost ones included). Not `all_in["generative"]`, which
    stops each target's relaxations at its first hit: a sweep spends them all."""
    training, learning = float(all_in["training"][unit]), float(all_in["active_learning"][unit])
    return {"training": training, "active_learning": learning, "evaluation": float(evaluation),
            "total": training + learning + float(evaluation)}


@dataclass(frozen=True)
class RssShare:
    """What RSS buys in one target with its uniform share of the budget."""

    label: str
    budget: float  # B / n_targets
    cost_per_relaxation: float | None  # per relaxation that can count; None when none in the cell can
    affordable: int  # relaxations the share buys, before the cap
    available: int  # relaxations RSS made in the cell that can count: the cap
    k: int  # min(affordable, available)
    expected_best: float | None  # E[best of k] drawn without replacement; None when k = 0 (nothing found)

    @property
    def capped(self) -> bool:
        """The share buys more than RSS made: its expected best is then that of all it made (optimistic)."""
        return self.affordable > self.available


def rss_share(label: str, budget: float, energies: Sequence[float], cost: float) -> RssShare:
    """k = floor(budget / cost per relaxation), capped at the arm's size, and the expected best of k.

    The cost per relaxation is that of one relaxation that can count: `cost` (all relaxations made in the
    cell, lost ones included, since a random search pays for them too) over the number that can count; with
    no lost relaxations it is the plain mean.
    """
    n = len(energies)
    per = cost / n if n and cost > 0 else None
    # floor with a hair of slack, so 300 / 100 is 3 whatever the rounding of the division
    affordable = int(math.floor(budget / per * (1 + 1e-12))) if per else 0
    k = min(affordable, n)
    best = float(expected_best_curve(energies)[k - 1]) if k else None
    return RssShare(label, float(budget), per, affordable, n, k, best)


def rss_shares(total_budget: float, targets: Sequence[TargetPhase], n_targets: int | None = None) -> list[RssShare]:
    """RSS's uniform allocation: B / n_targets per target (n_targets: every target of the sweep, by default
    those given)."""
    n = n_targets if n_targets is not None else len(targets)
    per = total_budget / n if n else 0.0
    return [rss_share(t.label, per, t.rss_energies, t.rss_cost) for t in targets]


# ---- comparing envelopes ------------------------------------------------------------------------------------
def windows(segments: Sequence[PhaseSegment]) -> dict[str, list[list[float]]]:
    """Δμ windows [min, max] of each phase on an envelope (one each on a lower envelope of distinct lines)."""
    out: dict[str, list[list[float]]] = {}
    for s in segments:
        if s.dmu_max - s.dmu_min > _MIN_WIDTH:
            out.setdefault(s.label, []).append([s.dmu_min, s.dmu_max])
    return out


def _label_at(segments: Sequence[PhaseSegment], dmu: float) -> str:
    return next((s.label for s in segments if s.dmu_min <= dmu <= s.dmu_max), segments[-1].label)


def differing_windows(reference: Sequence[PhaseSegment], arm: Sequence[PhaseSegment]) -> list[dict[str, Any]]:
    """Δμ sub-windows where the arm's stable phase is not the reference's, neighbours with the same pair
    merged."""
    edges = sorted({s.dmu_min for s in reference} | {s.dmu_max for s in reference}
                   | {s.dmu_min for s in arm} | {s.dmu_max for s in arm})
    out: list[dict[str, Any]] = []
    for left, right in zip(edges[:-1], edges[1:], strict=True):
        if right - left <= _MIN_WIDTH:
            continue
        mid = (left + right) / 2
        ref, got = _label_at(reference, mid), _label_at(arm, mid)
        if ref == got:
            continue
        last = out[-1] if out else None
        if last and (last["reference"], last["arm"]) == (ref, got) and left - last["dmu_max"] <= _MIN_WIDTH:
            last["dmu_max"] = right
        else:
            out.append({"dmu_min": left, "dmu_max": right, "reference": ref, "arm": got})
    return out


def segment_rows(segments: Sequence[PhaseSegment]) -> list[dict[str, Any]]:
    """JSON-ready segments, with their line (γ at Δμ = 0 and slope) so a figure can be drawn from them alone."""
    return [{"phase": s.label, "dmu_min": s.dmu_min, "dmu_max": s.dmu_max,
             "gamma_at_0_eV_per_A2": s.line.intercept, "slope": s.line.slope} for s in segments]


def compare_arm(reference: Sequence[PhaseSegment], arm: Sequence[PhaseSegment]) -> dict[str, Any]:
    """An arm's envelope against the reference: its segments, the reference phases it misses (with their
    reference windows) and where it names another stable phase."""
    own = windows(arm)
    missed = [{"phase": label, "windows": w} for label, w in windows(reference).items() if label not in own]
    return {"segments": segment_rows(arm), "missed": missed, "differs": differing_windows(reference, arm)}


def phase_comparison(targets: Sequence[TargetPhase], budget: Mapping[str, float], dmu_range: tuple[float, float],
                     *, adsorbate: str = "O", n_targets: int | None = None) -> dict[str, Any]:
    """The three envelopes and what each arm concludes (JSON-ready); {} without any reference line.

    `budget`: `sweep_budget`'s dict (its "total" is B); `n_targets`: the sweep's targets B is split over
    (default: those given)."""
    if not any(t.line is not None for t in targets):
        return {}
    reference = phase_diagram(arm_lines(targets, [t.reference_energy for t in targets]), dmu_range)
    shares = rss_shares(budget["total"], targets, n_targets)
    envelopes = {"surfdiff": phase_diagram(arm_lines(targets, [t.generative_best for t in targets]), dmu_range),
                 "rss": phase_diagram(arm_lines(targets, [s.expected_best for s in shares]), dmu_range)}
    n = n_targets if n_targets is not None else len(targets)
    return {"unit": HEADLINE, "adsorbate": adsorbate, "dmu_range": [float(x) for x in dmu_range],
            "budget": {**budget, "targets": n, "per_target": budget["total"] / n if n else 0.0},
            "reference": segment_rows(reference),
            "arms": {arm: compare_arm(reference, segs) for arm, segs in envelopes.items()},
            "rss_shares": [{**asdict(s), "capped": s.capped} for s in shares]}


def envelope_segments(rows: Sequence[Mapping[str, Any]]) -> list[PhaseSegment]:
    """Segments back from `segment_rows`, for plotting."""
    return [PhaseSegment(r["phase"], r["dmu_min"], r["dmu_max"],
                         PhaseLine(r["phase"], r["gamma_at_0_eV_per_A2"], r["slope"])) for r in rows]


# ---- in words -----------------------------------------------------------------------------------------------
def _span(w: Sequence[Sequence[float]] | None) -> str:
    return ", ".join(f"[{window_text(a, b)}]" for a, b in w) if w else "not stable"


def missed_sentence(comparison: Mapping[str, Any], arm: str) -> str:
    """"RSS at the same budget misses Ag12O8 p(4x4), stable for Δμ_O in [-0.40, +0.10] eV"."""
    name, ads = ARMS[arm], comparison.get("adsorbate", "O")
    missed = comparison["arms"][arm]["missed"]
    if not missed:
        return f"{name} finds every stable phase of the reference envelope"
    return f"{name} misses " + "; ".join(f"{m['phase']}, stable for Δμ_{ads} in {_span(m['windows'])} eV"
                                         for m in missed)


def phase_table(comparison: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per phase on the reference envelope: its Δμ window there and on each arm's envelope (eV)."""
    ref = windows(envelope_segments(comparison["reference"]))
    arms = {arm: windows(envelope_segments(c["segments"])) for arm, c in comparison["arms"].items()}
    return [{"phase": label, "reference (eV)": _span(w),
             **{f"{ARMS[arm]} (eV)": _span(own.get(label)) for arm, own in arms.items()}}
            for label, w in ref.items()]


def comparison_section(comparison: Mapping[str, Any]) -> list[str]:
    """The report's section in markdown; [] for results made before it was computed."""
    from surfdiff_core.report import markdown_table

    if not comparison:
        return []
    b, rows = comparison["budget"], phase_table(comparison)
    shares = comparison["rss_shares"]
    parts = ["\n## Phase diagram: surfdiff against RSS at the same all-in budget\n",
             "Lower envelopes of γ(Δμ) over every composition and cell. Reference: per target the lowest energy "
             "either arm found; surfdiff: the lowest its active-learning labels and evaluation relaxations found; "
             f"RSS: the generative arm's total all-in cost B = {b['total']:.4g} atom-weighted force calls "
             f"(training data {b['training']:.4g} + active learning {b['active_learning']:.4g} + every evaluation "
             f"relaxation {b['evaluation']:.4g}) spread evenly over the {b['targets']} targets "
             f"({b['per_target']:.4g} each); per target the expected best of the k relaxations that buys (random "
             "order, drawn from RSS's own relaxations there), no line where k = 0. A phase is missed when it is "
             "on the reference envelope but nowhere on the arm's.\n",
             markdown_table(rows, list(rows[0])) if rows else "no phases",
             *(f"\n{missed_sentence(comparison, arm)}.\n" for arm in comparison["arms"])]
    for arm, c in comparison["arms"].items():
        parts += [f"\n{ARMS[arm]} names another stable phase for Δμ in [{window_text(d['dmu_min'], d['dmu_max'])}] "
                  f"eV: {d['arm']} instead of {d['reference']}.\n" for d in c["differs"]]
    k_rows = [{"target": s["label"], "k (affordable)": s["affordable"], "RSS made (can count)": s["available"],
               "k": s["k"], "expected best (eV)": s["expected_best"]} for s in shares]
    parts += ["\nRSS's relaxations per target at that budget:\n", markdown_table(k_rows, list(k_rows[0]))
              if k_rows else "no targets"]
    capped = [s["label"] for s in shares if s["capped"]]
    if capped:
        parts.append(f"\nThe cap binds in {', '.join(capped)}: the share buys more relaxations than RSS made there, "
                     "so RSS's envelope uses all it made and is optimistic.\n")
    empty = [s["label"] for s in shares if not s["k"]]
    if empty:
        parts.append(f"\nRSS's share buys no relaxation in {', '.join(empty)}: nothing found there.\n")
    return parts
