"""Oracle cost of a study, and what each arm pays to reach a target energy, in force calls.

Units (every oracle call the study made is one of these documents):
- force calls: a relaxation costs steps + 1 energy+force evaluations, a single point 1;
- atom-weighted force calls: calls × atoms (the headline: a force field's cost grows with the atoms);
- atoms³-weighted force calls: calls × atoms³ (the scaling of plane-wave DFT), beside it.

A structure counts as a hit (a minimum within tol of the target) in either arm only if its relaxation finished
inside the confinement box (`in_box`, as the relaxers record it) without an error; a single point is never a
minimum. Structures that cannot hit still cost what they cost: they were spent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from surfdiff_core.store.documents import StructureDoc

UNITS: tuple[str, ...] = ("force_calls", "atom_force_calls", "atom3_force_calls")
UNIT_WORDS: dict[str, str] = {"force_calls": "oracle force calls",
                              "atom_force_calls": "atom-weighted oracle force calls",
                              "atom3_force_calls": "atoms³-weighted oracle force calls"}
HEADLINE = "atom_force_calls"


@dataclass(frozen=True)
class OracleCost:
    force_calls: float = 0.0
    atom_force_calls: float = 0.0  # force calls × atoms
    atom3_force_calls: float = 0.0  # force calls × atoms³

    def __add__(self, other: OracleCost) -> OracleCost:
        return OracleCost(*(getattr(self, u) + getattr(other, u) for u in UNITS))

    def scaled(self, factor: float) -> OracleCost:
        return OracleCost(*(getattr(self, u) * factor for u in UNITS))

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, float] | None) -> OracleCost | None:
        return None if d is None else cls(**{u: float(d.get(u, 0.0)) for u in UNITS})


ZERO = OracleCost()


def force_calls(doc: StructureDoc) -> int:
    """Oracle energy+force evaluations a document cost: 1 for a single point, steps + 1 for a relaxation (a
    failed one without recorded steps: at least its first call)."""
    if doc.source == "single_point":
        return 1
    return (doc.steps or 0) + 1


def doc_cost(doc: StructureDoc) -> OracleCost:
    calls = force_calls(doc)
    atoms = len(doc.structure["sites"])
    return OracleCost(float(calls), float(calls * atoms), float(calls * atoms**3))


def total_cost(docs: Iterable[StructureDoc]) -> OracleCost:
    out = ZERO
    for d in docs:
        out = out + doc_cost(d)
    return out


def can_hit(doc: StructureDoc) -> bool:
    """A relaxed minimum that may count as reaching a target: finished, inside the box, with an energy."""
    return doc.source != "single_point" and not doc.error and doc.in_box and doc.energy is not None


def is_hit(doc: StructureDoc, target: float, tol: float) -> bool:
    return can_hit(doc) and doc.energy <= target + tol


def best_energy(docs: Iterable[StructureDoc]) -> float | None:
    """Lowest energy among the documents that can be hits (None when none can)."""
    energies = [d.energy for d in docs if can_hit(d)]
    return min(energies) if energies else None


def expected_cost_to_reach(docs: Sequence[StructureDoc], target: float, tol: float) -> OracleCost | None:
    """RSS's expected cost, over all orders of its structures, until and including the first hit.

    With m hits among the structures, a non-hit comes before every hit with probability 1/(m+1) and a given
    hit is the first with probability 1/m, so E = Σ_non-hits c_i/(m+1) + Σ_hits c_j/m (each unit separately).
    None when nothing hits.
    """
    hits = [d for d in docs if is_hit(d, target, tol)]
    if not hits:
        return None
    m = len(hits)
    misses = [d for d in docs if not is_hit(d, target, tol)]
    return total_cost(misses).scaled(1.0 / (m + 1)) + total_cost(hits).scaled(1.0 / m)


def cost_until_hit(docs_in_order: Sequence[StructureDoc], target: float, tol: float) -> OracleCost | None:
    """Cumulative cost of the documents in the order they were spent, up to and including the first hit;
    None when none hits."""
    spent = ZERO
    for d in docs_in_order:
        spent = spent + doc_cost(d)
        if is_hit(d, target, tol):
            return spent
    return None


def hit_index(docs_in_order: Sequence[StructureDoc], target: float, tol: float) -> int | None:
    """0-based position of the first hit; None when none hits."""
    return next((i for i, d in enumerate(docs_in_order) if is_hit(d, target, tol)), None)


def spent_order(active_learning: Iterable[StructureDoc]) -> list[StructureDoc]:
    """Active-learning labels and single points in the order a round spends them: round by round, the round's
    relaxations (best MLFF energy first) before its single points (the next best samples)."""
    def key(d: StructureDoc) -> tuple:
        return (d.meta.get("round", 0), d.source == "single_point", d.meta.get("mlff_energy") or 0.0, d.doc_id)

    return sorted(active_learning, key=key)


def _maybe(cost: OracleCost | None) -> dict[str, float] | None:
    return None if cost is None else cost.as_dict()


def ratio(rss: OracleCost | None, generative: OracleCost | None) -> dict[str, float | None]:
    """RSS / generative cost per unit (> 1: the generative arm paid less); None where either is missing."""
    out: dict[str, float | None] = {}
    for u in UNITS:
        num = None if rss is None else getattr(rss, u)
        den = None if generative is None else getattr(generative, u)
        out[u] = num / den if num is not None and den else None
    return out


@dataclass(frozen=True)
class TargetCost:
    """What one target's two arms paid, in every unit."""

    rss_expected: OracleCost | None  # RSS in the target cell, expected until its best (within tol)
    until_hit: OracleCost | None  # the target's own labels, single points, relaxations until the first hit
    evaluation_until_hit: OracleCost | None  # the relaxations part of that (labels excluded)
    active_learning: OracleCost  # every label and single point of this target (spent whatever they found)

    @property
    def ratio(self) -> dict[str, float | None]:
        """The per-target ratio: RSS's expected cost over the target's own cost until its hit."""
        return ratio(self.rss_expected, self.until_hit)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: _maybe(getattr(self, f.name)) for f in fields(self)}
        return {**out, "ratio": self.ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetCost:
        get = OracleCost.from_dict
        return cls(rss_expected=get(d.get("rss_expected")), until_hit=get(d.get("until_hit")),
                   evaluation_until_hit=get(d.get("evaluation_until_hit")),
                   active_learning=get(d.get("active_learning")) or ZERO)


def target_cost(rss_docs: Sequence[StructureDoc], labels: Sequence[StructureDoc],
                relaxations: Sequence[StructureDoc], tol: float) -> TargetCost:
    """One target's costs: `labels` are its active-learning documents in spent order, `relaxations` the
    evaluation's in MLFF rank order, `rss_docs` every RSS relaxation made in the cell (lost ones included)."""
    goal = best_energy(rss_docs)
    labels_cost = total_cost(labels)
    if goal is None:
        return TargetCost(None, None, None, labels_cost)
    spent = [*labels, *relaxations]
    until = cost_until_hit(spent, goal, tol)
    i = hit_index(spent, goal, tol)
    evaluation = None if i is None else total_cost(relaxations[: max(0, i + 1 - len(labels))])
    return TargetCost(expected_cost_to_reach(rss_docs, goal, tol), until, evaluation, labels_cost)


@dataclass(frozen=True)
class AllIn:
    """The whole study's oracle cost against RSS's: the shared cost (training data and every active-learning
    call) is charged in full; each target adds its evaluation relaxations until its hit."""

    training: OracleCost
    active_learning: OracleCost  # every label and single point the model learned from, all targets
    rss_expected: OracleCost  # Σ over targets of RSS's expected cost to reach its best
    generative: OracleCost  # training + active learning + Σ evaluation relaxations until each hit
    reached: int
    targets: int
    ratio: dict[str, float | None]  # per unit; None unless every target was reached
    one_target: list[dict[str, float | None]]  # per target: as if the study had had only that target

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the per-target ratios (those go with their targets)."""
        return {"training": self.training.as_dict(), "active_learning": self.active_learning.as_dict(),
                "rss_expected": self.rss_expected.as_dict(), "generative": self.generative.as_dict(),
                "reached": self.reached, "targets": self.targets, "ratio": dict(self.ratio)}


def all_in(training: OracleCost, active_learning: OracleCost, targets: Sequence[TargetCost]) -> AllIn:
    """Sweep: Σ RSS expected / (training + active learning + Σ evaluation relaxations until each hit), None
    unless every target was reached. One target: its RSS expected / (training + active learning + its own
    relaxations until its hit). Every active-learning call counts: the rounds ran whatever they found."""
    shared = training + active_learning
    reached = [t for t in targets if t.evaluation_until_hit is not None and t.rss_expected is not None]
    rss = sum((t.rss_expected for t in reached), ZERO)
    generative = shared + sum((t.evaluation_until_hit for t in reached), ZERO)
    every = bool(targets) and len(reached) == len(targets)
    one = [ratio(t.rss_expected, None if t.evaluation_until_hit is None else shared + t.evaluation_until_hit)
           for t in targets]
    return AllIn(training, active_learning, rss, generative, len(reached), len(targets),
                 ratio(rss, generative) if every else dict.fromkeys(UNITS), one)


def cost_phrase(value: float | None, unit: str = HEADLINE, *, reached: tuple[int, int] | None = None) -> str:
    """A cost ratio in words, in `unit`: "3.2x fewer atom-weighted oracle force calls than RSS"."""
    words = UNIT_WORDS[unit]
    if value is None:
        return f"not all reached: {reached[0]} of {reached[1]}" if reached else "RSS's best not reached"
    return ratio_phrase(value, words)


def ratio_phrase(ratio: float, what: str | None = None, *, against: str = "RSS") -> str:
    """RSS's cost over surfdiff's in words: '3.2x fewer {what} than RSS', '1.4x more …', and 'as many … as RSS
    (1.02x)' within 5 % ('1.0x fewer' would read as a difference that is not there); without `what`, '3.2x fewer'."""
    if 0.95 <= ratio < 1.05:
        return f"as many {what} as {against} ({ratio:.2f}x)" if what else f"as many ({ratio:.2f}x)"
    amount = f"{ratio:.1f}x fewer" if ratio >= 1.0 else f"{1.0 / ratio:.1f}x more"
    return f"{amount} {what} than {against}" if what else amount
