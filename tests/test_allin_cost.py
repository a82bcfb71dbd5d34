"""All-in oracle cost: force calls, RSS's expected cost to reach a target, the generative arm's cost in the
order it was spent, and the per-target, one-target and sweep ratios (pure functions, hand-checked numbers)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from surfdiff_core.evaluate import budget, cost
from surfdiff_core.evaluate.cost import OracleCost
from surfdiff_core.store.documents import StructureDoc

TOL = 0.05


def doc(doc_id: str, *, energy: float | None = None, steps: int | None = None, atoms: int = 4,
        source: str = "relaxed", in_box: bool = True, error: str | None = None, meta: dict | None = None,
        parent_id: str | None = None) -> StructureDoc:
    """A document with only what the cost model reads (atoms = len(structure["sites"]))."""
    return StructureDoc.model_construct(doc_id=doc_id, source=source, structure={"sites": [{}] * atoms},
                                        energy=energy, steps=steps, in_box=in_box, error=error,
                                        meta=meta or {}, parent_id=parent_id)


def al(doc_id: str, round_: int, *, single_point: bool = False, **kw) -> StructureDoc:
    return doc(doc_id, source="single_point" if single_point else "relaxed",
               steps=0 if single_point else kw.pop("steps", 3),
               meta={"active_learning": True, "round": round_, "mlff_energy": kw.pop("mlff", 0.0)}, **kw)


def costs(d: StructureDoc) -> np.ndarray:
    """Force calls, × atoms, × atoms³ computed here independently of the module."""
    calls = 1 if d.source == "single_point" else (d.steps or 0) + 1
    n = len(d.structure["sites"])
    return np.array([calls, calls * n, calls * n**3], float)


def as_array(c: OracleCost) -> np.ndarray:
    return np.array([c.force_calls, c.atom_force_calls, c.atom3_force_calls])


# ---- units -------------------------------------------------------------------------------------------------
def test_force_calls_per_document_and_sum():
    relaxation, point, failed = doc("r", steps=9, atoms=5), doc("s", steps=0, source="single_point"), \
        doc("f", error="boom", atoms=3)
    assert [cost.force_calls(d) for d in (relaxation, point, failed)] == [10, 1, 1]
    total = cost.total_cost([relaxation, point, failed])
    assert as_array(total) == pytest.approx([12, 10 * 5 + 4 + 3, 10 * 125 + 64 + 27])
    assert cost.doc_cost(relaxation) + cost.doc_cost(point) == cost.total_cost([relaxation, point])


# ---- RSS: expected cost over random orders ------------------------------------------------------------------
def test_expected_cost_matches_every_permutation():
    rng = np.random.default_rng(11)
    energies = [-1.0, -0.97, -0.5, 0.0, 0.3, -3.0]  # two hits within 0.05 of -1; -3 left the box
    docs = [doc(f"r{i}", energy=e, steps=int(rng.integers(2, 30)), atoms=int(rng.integers(3, 9)),
                in_box=(e != -3.0)) for i, e in enumerate(energies)]
    assert cost.best_energy(docs) == -1.0  # the out-of-box structure is no minimum

    def first_hit_cost(order) -> np.ndarray:
        total = np.zeros(3)
        for d in order:
            total += costs(d)
            if d.in_box and d.energy <= -1.0 + TOL:
                return total
        raise AssertionError("every order has a hit")

    brute = np.mean([first_hit_cost(p) for p in itertools.permutations(docs)], axis=0)
    exact = cost.expected_cost_to_reach(docs, -1.0, TOL)
    assert as_array(exact) == pytest.approx(brute, rel=1e-12)
    assert cost.expected_cost_to_reach(docs, -2.0, TOL) is None  # only the out-of-box one is that low


def test_expected_cost_with_equal_costs_is_the_closed_form():
    energies = [0.2, -1.0, 0.1, -1.02, 0.5, 0.0, -0.2]
    docs = [doc(f"r{i}", energy=e, steps=7, atoms=6) for i, e in enumerate(energies)]
    n, m, c = len(docs), 2, costs(docs[0])
    exact = as_array(cost.expected_cost_to_reach(docs, -1.02, TOL))
    assert exact == pytest.approx(c * (n + 1) / (m + 1))
    assert exact[0] == pytest.approx(8 * budget.expected_relaxations_to_reach(energies, -1.02, TOL))


# ---- the generative arm: in the order the oracle work was spent --------------------------------------------
def test_labels_and_single_points_are_spent_round_by_round():
    docs = [al("r2-label", 2, energy=-0.5, steps=4, mlff=-2.0), al("r1-point", 1, single_point=True, energy=-9.0),
            al("r1-label-b", 1, energy=-0.4, steps=2, mlff=-1.0), al("r1-label-a", 1, energy=-0.3, steps=1, mlff=-3.0),
            al("r2-point", 2, single_point=True, energy=-9.0)]
    order = cost.spent_order(docs)
    assert [d.doc_id for d in order] == ["r1-label-a", "r1-label-b", "r1-point", "r2-label", "r2-point"]
    relaxations = [doc("e1", energy=-0.8, steps=5), doc("e2", energy=-1.0, steps=3), doc("e3", energy=-1.0)]
    # the single points' energy (-9) is far below the target but they are no minima: the hit is e2
    until = cost.cost_until_hit([*order, *relaxations], -1.0, TOL)
    assert until.force_calls == (2 + 3 + 1 + 5 + 1) + (6 + 4)
    assert cost.hit_index([*order, *relaxations], -1.0, TOL) == 6
    assert cost.cost_until_hit(order, -1.0, TOL) is None


def test_single_points_are_charged_in_the_round_they_were_spent():
    docs = cost.spent_order([al("a", 1, energy=-1.0), *(al(f"p{i}", 1, single_point=True) for i in range(3)),
                             al("b", 2, energy=-2.0), al("q", 2, single_point=True)])
    per_relaxation = [doc("x", steps=1)]  # two force calls per relaxation
    energies = budget.labelled_energies(docs, per_relaxation)
    # round 1: its label, then its 3 points = 2 relaxations; round 2: its label, its 4th point due nothing more
    np.testing.assert_array_equal(energies, [-1.0, np.nan, np.nan, -2.0])
    assert np.isnan(energies).sum() == budget.single_point_charge(4, per_relaxation)
    # to reach -2: 4 relaxations in the order spent (all single points placed after all labels said 2)
    assert budget.relaxations_to_reach(energies, -2.0) == 4


def test_an_out_of_box_generative_relaxation_is_no_hit_in_either_count():
    generated = [doc(f"g{i}", energy=e, source="generated") for i, e in enumerate([-3.0, -2.0, -1.0])]
    relaxed = [doc("r0", energy=-5.0, steps=4, in_box=False, parent_id="g0"),  # lowest, but left the box
               doc("r1", energy=-2.0, steps=4, error=None, parent_id="g1"),
               doc("r2", energy=-4.0, steps=4, parent_id="g2")]
    ranked = budget.ranked_relaxations(generated, relaxed)
    assert [d.doc_id for d in ranked] == ["r0", "r1", "r2"]
    np.testing.assert_array_equal(budget.generative_ranked_energies(generated, relaxed), [np.nan, -2.0, -4.0])
    rss = [doc(f"s{i}", energy=e, steps=4) for i, e in enumerate([-4.0, 0.0, 0.0])]
    assert cost.cost_until_hit(ranked, -5.0, TOL) is None
    assert cost.cost_until_hit(ranked, -4.0, TOL).force_calls == 15  # r0 and r1 were spent before r2
    sp = budget.speedup([-4.0, 0.0, 0.0], budget.generative_ranked_energies(generated, relaxed))
    assert (sp.rss_relaxations, sp.generative_relaxations) == (2.0, 3)
    tc = cost.target_cost(rss, [], ranked, TOL)
    assert tc.until_hit.force_calls == 15 and tc.rss_expected.force_calls == pytest.approx(10.0)


def test_lost_rss_relaxations_count_as_spent_in_the_relaxation_ratio():
    sp = budget.speedup([-1.0, np.nan, 0.0, np.nan], [0.0, -1.0])
    assert sp.target == -1.0 and sp.rss_relaxations == pytest.approx(2.5)  # (4 + 1) / (1 + 1)


# ---- per target, one target, the sweep ---------------------------------------------------------------------
def tiny_study():
    """Training: two 4-atom RSS relaxations of 10 calls and a failed one (1 call). Target A (5 atoms): one
    label (4 calls, not a hit), then the first evaluation relaxation hits (2 calls). Target B (6 atoms): one
    single point (1 call, energy below everything), then the second relaxation hits (3 + 3 calls)."""
    training = [doc("t1", energy=-1.0, steps=9, source="rss"), doc("t2", energy=-1.1, steps=9, source="rss"),
                doc("t3", source="rss", error="relaxation failed")]
    a_labels = [al("a-label", 1, energy=0.3, steps=3, atoms=5)]
    a_rss = [doc("a-s1", energy=-1.0, steps=4, atoms=5), doc("a-s2", energy=0.0, steps=9, atoms=5),
             doc("a-s3", energy=0.5, steps=4, atoms=5)]
    a_eval = [doc("a-e1", energy=-0.98, steps=1, atoms=5), doc("a-e2", energy=-0.1, steps=9, atoms=5)]
    b_labels = [al("b-point", 1, single_point=True, energy=-5.0, atoms=6)]
    b_rss = [doc("b-s1", energy=-2.0, steps=5, atoms=6), doc("b-s2", energy=-1.0, steps=11, atoms=6)]
    b_eval = [doc("b-e1", energy=-1.5, steps=2, atoms=6), doc("b-e2", energy=-2.01, steps=2, atoms=6)]
    a = cost.target_cost(a_rss, a_labels, a_eval, TOL)
    b = cost.target_cost(b_rss, b_labels, b_eval, TOL)
    return training, [*a_labels, *b_labels], a, b


def test_hand_computed_ratios():
    training, labels, a, b = tiny_study()
    assert as_array(a.rss_expected) == pytest.approx([12.5, 62.5, 1562.5])  # (10 + 5)/2 + 5 calls
    assert as_array(a.until_hit) == pytest.approx([6, 30, 750])
    assert as_array(b.rss_expected) == pytest.approx([12, 72, 2592])  # 12/2 + 6 calls
    assert as_array(b.until_hit) == pytest.approx([7, 42, 1512])
    assert a.ratio["atom_force_calls"] == pytest.approx(62.5 / 30)
    assert b.ratio["force_calls"] == pytest.approx(12 / 7)
    summary = cost.all_in(cost.total_cost(training), cost.total_cost(labels), [a, b])
    assert as_array(summary.training) == pytest.approx([21, 84, 1344])
    assert as_array(summary.active_learning) == pytest.approx([5, 26, 716])
    assert as_array(summary.generative) == pytest.approx([34, 156, 3606])  # + evaluation until each hit
    assert [summary.ratio[u] for u in cost.UNITS] == pytest.approx([24.5 / 34, 134.5 / 156, 4154.5 / 3606])
    one_a, one_b = summary.one_target
    assert [one_a[u] for u in cost.UNITS] == pytest.approx([12.5 / 28, 62.5 / 120, 1562.5 / 2310])
    assert [one_b[u] for u in cost.UNITS] == pytest.approx([12 / 32, 72 / 146, 2592 / 3356])
    for per_target, one in ((a, one_a), (b, one_b)):  # the shared cost only ever adds
        assert all(one[u] <= per_target.ratio[u] for u in cost.UNITS)
    assert (summary.reached, summary.targets) == (2, 2)
    assert cost.cost_phrase(summary.ratio["atom_force_calls"]) == "1.2x more atom-weighted oracle force calls than RSS"
    assert cost.cost_phrase(3.21) == "3.2x fewer atom-weighted oracle force calls than RSS"
    assert cost.cost_phrase(0.96) == "as many atom-weighted oracle force calls as RSS (0.96x)"


def test_sweep_all_in_is_none_when_a_target_is_not_reached():
    training, labels, a, _ = tiny_study()
    missed = cost.target_cost([doc("c-s1", energy=-3.0, steps=4)], [], [doc("c-e1", energy=-1.0, steps=4)], TOL)
    assert missed.until_hit is None and missed.rss_expected is not None
    summary = cost.all_in(cost.total_cost(training), cost.total_cost(labels), [a, missed])
    assert summary.ratio == dict.fromkeys(cost.UNITS) and (summary.reached, summary.targets) == (1, 2)
    assert summary.one_target[1] == dict.fromkeys(cost.UNITS) and summary.one_target[0]["force_calls"] > 0
    assert cost.cost_phrase(None, reached=(1, 2)) == "not all reached: 1 of 2"
    from surfdiff_core.stages.evaluate_report import all_in_summary

    assert all_in_summary(summary.as_dict()) == "all-in (training data counted): not all reached: 1 of 2"


def test_stage_all_in_charges_shared_cost_once_and_reaches_the_report():
    from surfdiff_core.stages.evaluate import all_in_cost
    from surfdiff_core.stages.evaluate_report import (
        EvaluationResult,
        TargetEvaluation,
        all_in_summary,
        markdown_report,
    )

    training, labels, a, b = tiny_study()
    # the store's training query also returns the labels, and an RSS-arm relaxation of a target in the
    # training cell: neither is training data a second time
    arm = doc("a-s1", energy=-1.0, steps=4, atoms=5, source="rss")

    def target(cell: str, tc: cost.TargetCost, rss_ids: list[str]) -> TargetEvaluation:
        return TargetEvaluation(cell=cell, composition="Ag2O1", system_id=cell, validity={"valid": 1, "total": 1},
                                n_valid=1, n_distinct=1, uniqueness=1.0, novelty=None, generative_energies=[-1.0],
                                rss_energies=[-1.0], speedup={"ratio": 2.0}, steps_generative={}, steps_rss={},
                                rss_ids=rss_ids, cost=tc.as_dict())

    targets = [target("p(2x2)", a, ["a-s1"]), target("p(3x3)", b, [])]
    summary = all_in_cost([*training, *labels, arm], targets)
    assert summary["training"]["force_calls"] == 21 and summary["active_learning"]["force_calls"] == 5
    assert summary["ratio"]["atom_force_calls"] == pytest.approx(134.5 / 156)
    assert targets[0].one_target_all_in["atom_force_calls"] == pytest.approx(62.5 / 120)
    result = EvaluationResult(study="s", run_id="r", config_hash="h", model_id="m", energy_model="emt",
                              training_cost={"structures": 3, "force_calls": 21, "atom_steps": 84},
                              targets=targets, all_in=summary)
    row = result.rows()[0]
    assert row["speedup_atom_weighted"] == pytest.approx(62.5 / 30, abs=1e-4)
    assert row["one_target_all_in"] == pytest.approx(62.5 / 120, abs=1e-4)
    assert all_in_summary(summary) == ("all-in (training data counted): 1.2x more atom-weighted oracle force "
                                       "calls than RSS (force calls: 1.4x more; atoms³-weighted: 1.2x fewer)")
    report = markdown_report(result)
    assert "| Ag2O1 p(2x2) | 2.00x | 2.08x | 0.52x |" in report
    assert "**All-in over the sweep** (training data counted): 1.2x more atom-weighted oracle force calls" in report
    # a result stored before the cost was counted still makes its table and report
    old = EvaluationResult(study="s", run_id="r", config_hash="h", model_id="m", energy_model="emt",
                           training_cost={"structures": 1, "force_calls": 1, "atom_steps": 1},
                           targets=[target("p(2x2)", a, [])])
    old.targets[0].cost = {}
    assert old.rows()[0]["speedup_atom_weighted"] is None and "All-in" not in markdown_report(old)
