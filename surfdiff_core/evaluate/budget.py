"""Best energy against the number of oracle relaxations, for random structure search and the generative arm.

RSS relaxes independent random structures, so its order is arbitrary: its curve is the expected best of k
relaxations over all orderings of the n it made, computed exactly from order statistics (drawing k of n
without replacement). The generative arm relaxes its samples in the order the product ranks them (MLFF
energy, lowest first): its curve is the running minimum in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from surfdiff_core.evaluate.cost import can_hit, ratio_phrase
from surfdiff_core.store.documents import StructureDoc


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def expected_best_curve(energies: Sequence[float]) -> np.ndarray:
    """E[min of k energies drawn without replacement from `energies`], for k = 1..n.

    With e_(1) <= ... <= e_(n) sorted, the minimum of a random k-subset is e_(i) with probability
    C(n-i, k-1) / C(n, k); evaluated in log space so n in the thousands is exact and stable.
    """
    e = np.sort(np.asarray(energies, float))
    n = len(e)
    if n == 0:
        return np.array([])
    lf = _log_factorials(n)
    rest = n - np.arange(1, n + 1)  # n - i for the rank i = 1..n of the minimum
    curve = np.empty(n)
    for k in range(1, n + 1):  # one row at a time: O(n) memory for n in the thousands
        feasible = rest >= k - 1  # C(n - i, k - 1) is zero otherwise
        r = rest[feasible]
        log_p = lf[r] - lf[k - 1] - lf[r - (k - 1)] - (lf[n] - lf[k] - lf[n - k])
        curve[k - 1] = np.exp(log_p) @ e[feasible]
    return curve


def bootstrap_band(
    energies: Sequence[float], *, n_boot: int = 200, level: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) pointwise `level` band of the expected-best curve over bootstrap resamples of `energies`:
    how much the curve would move with another RSS run of the same size.
    """
    e = np.asarray(energies, float)
    if len(e) == 0:
        return np.array([]), np.array([])
    rng = np.random.default_rng(seed)
    curves = np.stack([expected_best_curve(rng.choice(e, size=len(e), replace=True)) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    return np.quantile(curves, alpha, axis=0), np.quantile(curves, 1 - alpha, axis=0)


def running_best(energies_in_order: Sequence[float]) -> np.ndarray:
    """Best energy after each relaxation, in the order given (NaN entries, e.g. failures, are skipped)."""
    e = np.asarray(energies_in_order, float)
    return np.fmin.accumulate(np.where(np.isnan(e), np.inf, e)) if len(e) else e


def ranked_energies(rank_energies: Sequence[float], oracle_energies: Sequence[float]) -> np.ndarray:
    """Oracle energies in the order of `rank_energies` (lowest first; stable for ties)."""
    order = np.argsort(np.asarray(rank_energies, float), kind="stable")
    return np.asarray(oracle_energies, float)[order]


def ranked_relaxations(generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc]) -> list[StructureDoc]:
    """The relaxed children of `generated` in the order the product spends them: by the parents' MLFF energy
    (lowest first, stable for ties). Parents without an MLFF energy or a relaxed child are left out."""
    child = {d.parent_id: d for d in relaxed if d.parent_id is not None}
    pairs = [(p.energy, child[p.doc_id]) for p in generated if p.doc_id in child and p.energy is not None]
    order = np.argsort([e for e, _ in pairs], kind="stable")
    return [pairs[i][1] for i in order]


def hit_energy(doc: StructureDoc) -> float:
    """A document's energy as a candidate minimum: NaN when it cannot count (failed, left the box, a single
    point), though it keeps its place and its cost."""
    return float(doc.energy) if can_hit(doc) else np.nan


def generative_ranked_energies(
    generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc]
) -> np.ndarray:
    """Oracle energies of the relaxed children of `generated`, ordered by the parents' MLFF energy.

    Parents without a relaxed child (not in the top-K) are left out; a failed relaxation, or one that left the
    box, keeps its place in the order with a NaN energy: it cost a relaxation too, but is no minimum (the same
    rule as for RSS).
    """
    return np.array([hit_energy(d) for d in ranked_relaxations(generated, relaxed)], float)


def labelled_energies(labels_in_order: Sequence[StructureDoc], relaxations: Sequence[StructureDoc]) -> np.ndarray:
    """The active-learning documents as entries of the generative arm, round by round as they were spent:
    each label relaxation its energy (NaN if it cannot count), and a round's single points as the empty
    relaxations their force calls are worth so far (rounded up cumulatively, so the total matches
    `single_point_charge` of all of them)."""
    out: list[float] = []
    points = charged = 0
    for d in labels_in_order:
        if d.source != "single_point":
            out.append(hit_energy(d))
            continue
        points += 1
        due = single_point_charge(points, relaxations)
        out += [np.nan] * (due - charged)
        charged = due
    return np.array(out, float)


def _with_oracle_energy(generated: Sequence[StructureDoc],
                        relaxed: Sequence[StructureDoc]) -> list[tuple[StructureDoc, float]]:
    """(sample, oracle energy of its relaxed child) for samples with an MLFF energy and a relaxed child that
    has an energy."""
    child = {d.parent_id: d.energy for d in relaxed if d.parent_id is not None and d.energy is not None}
    return [(p, child[p.doc_id]) for p in generated if p.doc_id in child and p.energy is not None]


def _ranked_pairs(generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc],
                  min_pairs: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(MLFF energies, oracle-relaxed energies) of the relaxed samples; None with fewer than `min_pairs` or a
    constant side (no ranking to judge)."""
    pairs = [(p.energy, oracle) for p, oracle in _with_oracle_energy(generated, relaxed)]
    if len(pairs) < min_pairs:
        return None
    mlff, oracle = zip(*pairs, strict=True)
    if len(set(mlff)) < 2 or len(set(oracle)) < 2:
        return None
    return mlff, oracle


def mlff_rank_correlation(generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc]) -> float | None:
    """Spearman rank correlation of the samples' MLFF energies with their oracle-relaxed energies: how well
    the product's ranking predicts the oracle's (None with fewer than 3 relaxed pairs or constant ranks)."""
    from scipy.stats import spearmanr

    pairs = _ranked_pairs(generated, relaxed)
    return None if pairs is None else float(spearmanr(*pairs).statistic)


def mlff_ranking_warning(generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc],
                         min_pairs: int = 8, alpha: float = 0.05) -> str | None:
    """One line when the MLFF's order of the relaxed samples is not significantly better than chance (one-sided
    Spearman test at `alpha`, over at least `min_pairs` relaxed samples; fewer cannot tell): the samples relaxed
    first are then a lottery, however good they are as a population. None when informative or untested."""
    from scipy.stats import spearmanr

    pairs = _ranked_pairs(generated, relaxed, min_pairs)
    if pairs is None:
        return None
    test = spearmanr(*pairs, alternative="greater")
    if test.pvalue < alpha:
        return None
    return (f"the MLFF ranks the relaxed samples not significantly better than chance (Spearman "
            f"{test.statistic:+.2f} over {len(pairs[0])}, p = {test.pvalue:.2f}): give it oracle labels in this "
            f"cell (active_learning) or more training data")


def committee_calibration(generated: Sequence[StructureDoc], relaxed: Sequence[StructureDoc]) -> float | None:
    """Spearman rank correlation of the MLFF committee's spread (meta.mlff_energy_std) with the size of the
    MLFF's error against the oracle-relaxed energy, after removing their median offset: positive when the
    spread flags the samples the MLFF misjudges (None without a committee or with fewer than 3 pairs)."""
    from scipy.stats import spearmanr

    rows = [(p.meta["mlff_energy_std"], p.energy - oracle) for p, oracle in _with_oracle_energy(generated, relaxed)
            if p.meta.get("mlff_energy_std") is not None]
    if len(rows) < 3:
        return None
    spread, error = (np.asarray(x, dtype=float) for x in zip(*rows, strict=True))
    error = np.abs(error - np.median(error))
    if np.ptp(spread) == 0 or np.ptp(error) == 0:
        return None
    return float(spearmanr(spread, error).statistic)


def relaxations_to_reach(curve_or_energies: Sequence[float], target: float, tol: float = 0.05) -> int | None:
    """Fewest relaxations (1-based) after which the best energy is within `tol` eV of `target`; None if never.

    Takes energies in relaxation order or an already non-increasing curve (the running minimum of a curve
    is the curve itself).
    """
    best = running_best(curve_or_energies)
    hits = np.flatnonzero(best <= target + tol)
    return int(hits[0]) + 1 if len(hits) else None


def expected_relaxations_to_reach(energies: Sequence[float], target: float, tol: float = 0.05) -> float | None:
    """Expected number of RSS relaxations, in random order, until one lands within `tol` of `target`.

    With m of the n structures within tol, the first hit in a random permutation is at (n + 1) / (m + 1)
    on average. None when none is within tol.
    """
    e = np.asarray(energies, float)
    m = int(np.sum(e <= target + tol))
    return (len(e) + 1) / (m + 1) if m else None


@dataclass(frozen=True)
class Speedup:
    target: float  # eV: the energy both arms must reach (within tol)
    tol: float
    rss_relaxations: float | None  # expected, over random orders of the RSS structures
    generative_relaxations: int | None  # in the generative arm's ranking order
    ratio: float | None  # rss / generative: > 1 means the generative arm needs fewer relaxations


def speedup(
    rss_energies: Sequence[float],
    gen_ranked_energies: Sequence[float],
    tol: float = 0.05,
    target: float | None = None,
) -> Speedup:
    """Relaxations each arm needs to come within `tol` of `target` (default: the best energy RSS found with
    its full budget), and their ratio. Pass the lowest known energy as `target` to ask the harder question.
    NaN entries (relaxations that failed or left the box) are never hits but count as spent, in both arms.
    """
    rss = np.asarray(rss_energies, float)  # NaN: a relaxation spent that cannot count (failed, out of box)
    goal = float(np.nanmin(rss)) if target is None else float(target)
    rss_cost = expected_relaxations_to_reach(rss, goal, tol)
    gen_cost = relaxations_to_reach(gen_ranked_energies, goal, tol)
    ratio = rss_cost / gen_cost if rss_cost is not None and gen_cost is not None else None
    return Speedup(goal, tol, rss_cost, gen_cost, ratio)


def speedup_phrase(ratio: float | None) -> str:
    """The ratio in words: how many times fewer (or more) oracle relaxations surfdiff needed than RSS."""
    if ratio is None:
        return "RSS's best not reached"
    return ratio_phrase(ratio, "oracle relaxations")


def energy_phrase(energy: float | None) -> str:
    """A best energy as printed: 4 decimals in eV, or why there is none."""
    return "none (no valid relaxation)" if energy is None else f"{energy:.4f} eV"


@dataclass(frozen=True)
class TrainingCost:
    structures: int
    force_calls: int  # oracle energy+force evaluations: relaxation steps + 1 per structure
    atom_steps: int  # force calls weighted by the atoms in each structure (cost scales with size)


def training_cost(docs: Sequence[StructureDoc]) -> TrainingCost:
    """Oracle cost of making the training documents; a document without `steps` counts as one call."""
    calls = atom_steps = 0
    for d in docs:
        n_calls = (d.steps or 0) + 1
        calls += n_calls
        atom_steps += n_calls * len(d.structure["sites"])
    return TrainingCost(len(docs), calls, atom_steps)


def single_point_charge(n_points: int, relaxations: Sequence[StructureDoc]) -> int:
    """Relaxations that `n_points` oracle single points are worth: their force calls over the mean force calls
    of one of `relaxations` (steps + 1), rounded up; one relaxation each when nothing says what one costs."""
    if n_points <= 0:
        return 0
    calls = [(d.steps or 0) + 1 for d in relaxations if d.steps is not None]
    return int(np.ceil(n_points / float(np.mean(calls)))) if calls else n_points


def steps_summary(docs: Sequence[StructureDoc]) -> dict[str, float]:
    """Relaxation steps per structure: count, mean, median, p90 (documents with `steps` only)."""
    steps = np.array([d.steps for d in docs if d.steps is not None], float)
    if not len(steps):
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "p90": float("nan")}
    return {"n": len(steps), "mean": float(steps.mean()), "median": float(np.median(steps)),
            "p90": float(np.quantile(steps, 0.9))}
