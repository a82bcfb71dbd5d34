"""Phase diagram per arm: the reference envelope, surfdiff's and RSS's at the same all-in budget, what each
misses; the budget split; the report section, figure and stage glue (hand-made lines, hand-computed numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase import Atoms

from surfdiff_core.evaluate import phase_compare as pc
from surfdiff_core.evaluate.budget import expected_best_curve
from surfdiff_core.evaluate.phase import PhaseLine, clean_line, phase_diagram
from surfdiff_core.store.documents import StructureDoc

AREA = 10.0  # Å²: 1 eV moves γ by 0.1 eV/Å²
DMU = (-2.0, 1.0)
# three stable phases on the reference: clean for Δμ < -1, LOW for -1..0, HIGH above 0
LOW = PhaseLine("Ag2O1 p(2x2)", -0.05, -0.05, "Ag2O1", "p(2x2)")
HIGH = PhaseLine("Ag12O8 p(4x4)", -0.05, -0.10, "Ag12O8", "p(4x4)")
NEVER = PhaseLine("Ag3O1 p(3x3)", 0.10, -0.05, "Ag3O1", "p(3x3)")


def target(line: PhaseLine | None, *, ref: float = -10.0, gen: float | None = -10.0,
           rss: tuple[float, ...] = (-10.0,), rss_cost: float = 100.0) -> pc.TargetPhase:
    return pc.TargetPhase(label=line.label if line else "Ag1O1 p(1x1)", line=line, reference_energy=ref,
                          area=AREA, generative_best=gen, rss_energies=rss, rss_cost=rss_cost)


def test_arm_missing_the_middle_phase_is_reported_with_its_window():
    reference = phase_diagram([LOW, HIGH, NEVER, clean_line()], DMU)
    assert [(s.label, s.dmu_min, s.dmu_max) for s in reference] == [
        ("clean", -2.0, pytest.approx(-1.0)), (LOW.label, pytest.approx(-1.0), pytest.approx(0.0)),
        (HIGH.label, pytest.approx(0.0), 1.0)]
    # the arm's LOW is 2 eV higher: γ + 0.2 eV/Å², stable nowhere; clean then meets HIGH at Δμ = -0.5
    arm = pc.arm_lines([target(LOW), target(HIGH), target(NEVER)], [-8.0, -10.0, -10.0])
    assert arm[0].intercept == pytest.approx(0.15) and arm[0].slope == LOW.slope
    got = pc.compare_arm(reference, phase_diagram(arm, DMU))
    assert got["missed"] == [{"phase": LOW.label, "windows": [[pytest.approx(-1.0), pytest.approx(0.0)]]}]
    assert [(d["reference"], d["arm"], d["dmu_min"], d["dmu_max"]) for d in got["differs"]] == [
        (LOW.label, "clean", pytest.approx(-1.0), pytest.approx(-0.5)),
        (LOW.label, HIGH.label, pytest.approx(-0.5), pytest.approx(0.0))]
    assert [r["phase"] for r in got["segments"]] == ["clean", HIGH.label]


def test_equal_envelopes_miss_nothing():
    lines = [LOW, HIGH, NEVER, clean_line()]
    reference = phase_diagram(lines, DMU)
    same = pc.compare_arm(reference, phase_diagram(list(lines), DMU))
    assert same["missed"] == [] and same["differs"] == []
    # a phase that is higher but still wins somewhere is not missed, only narrower
    arm = pc.arm_lines([target(LOW), target(HIGH), target(NEVER)], [-9.8, -10.0, -10.0])
    narrower = pc.compare_arm(reference, phase_diagram(arm, DMU))
    assert narrower["missed"] == [] and len(narrower["differs"]) == 2


def test_sweep_budget_is_the_total_not_until_the_hits():
    all_in = {"training": {"atom_force_calls": 1000.0}, "active_learning": {"atom_force_calls": 200.0},
              "generative": {"atom_force_calls": 1300.0}}  # until each hit: not B
    b = pc.sweep_budget(all_in, 400.0)
    assert b == {"training": 1000.0, "active_learning": 200.0, "evaluation": 400.0, "total": 1600.0}


def test_rss_budget_split_by_hand():
    rng = np.random.default_rng(7)
    plain = tuple(rng.normal(-10, 0.3, 5))
    targets = [target(LOW, rss=plain, rss_cost=500.0),  # 100 per relaxation: 400 buys 4
               target(HIGH, rss=(-10.0, -9.0), rss_cost=1000.0),  # 500 each: 400 buys none
               target(NEVER, rss=(-9.0, -9.5, -9.9), rss_cost=30.0),  # 10 each: 40, capped at the 3 made
               # 2 that count; lost ones' cost (800 in all) shared out: 400 per relaxation that counts
               target(None, rss=(-9.0, -8.0), rss_cost=800.0)]
    shares = pc.rss_shares(1600.0, targets)
    assert [s.budget for s in shares] == [400.0] * 4
    assert [s.cost_per_relaxation for s in shares] == [100.0, 500.0, 10.0, 400.0]
    assert [(s.affordable, s.available, s.k, s.capped) for s in shares] == [
        (4, 5, 4, False), (0, 2, 0, False), (40, 3, 3, True), (1, 2, 1, False)]
    assert shares[0].expected_best == pytest.approx(expected_best_curve(plain)[3])
    assert shares[1].expected_best is None  # nothing found
    assert shares[2].expected_best == pytest.approx(-9.9)  # all three: the best
    assert shares[3].expected_best == pytest.approx(-8.5)  # one of two at random
    # exact division is not floored one short; a target where nothing counts buys nothing
    assert pc.rss_share("x", 300.0, (-1.0,) * 4, 400.0).k == 3
    assert pc.rss_share("x", 1e9, (), 500.0).k == 0
    # the sweep's targets, not only those given, share B
    assert pc.rss_shares(1600.0, targets[:1], n_targets=8)[0].affordable == 2


def comparison() -> dict:
    """LOW's RSS share buys nothing (RSS misses it); surfdiff finds every reference phase."""
    targets = [target(LOW, rss=(-10.0,), rss_cost=10_000.0), target(HIGH, rss=(-10.0, -9.0), rss_cost=20.0),
               target(NEVER, gen=None, rss=(-10.0,), rss_cost=10.0)]
    budget = pc.sweep_budget({"training": {"atom_force_calls": 500.0},
                              "active_learning": {"atom_force_calls": 100.0}}, 300.0)
    return pc.phase_comparison(targets, budget, DMU, adsorbate="O")


def test_phase_comparison_names_what_rss_misses_at_the_same_budget():
    c = comparison()
    assert c["budget"]["total"] == 900.0 and c["budget"]["per_target"] == 300.0
    assert [(s["k"], s["capped"]) for s in c["rss_shares"]] == [(0, False), (2, True), (1, True)]
    assert c["arms"]["surfdiff"]["missed"] == [] and c["arms"]["surfdiff"]["differs"] == []
    (missed,) = c["arms"]["rss"]["missed"]
    assert missed["phase"] == LOW.label and missed["windows"] == [[pytest.approx(-1.0), pytest.approx(0.0)]]
    assert pc.missed_sentence(c, "rss") == ("RSS at the same budget misses Ag2O1 p(2x2), stable for Δμ_O in "
                                            "[-1.00, +0.00] eV")
    assert pc.missed_sentence(c, "surfdiff") == "surfdiff finds every stable phase of the reference envelope"
    assert pc.phase_table(c)[1] == {"phase": LOW.label, "reference (eV)": "[-1.00, +0.00]",
                                    "surfdiff (eV)": "[-1.00, +0.00]", "RSS at the same budget (eV)": "not stable"}
    assert pc.phase_comparison([target(None, ref=None)], c["budget"], DMU) == {}


def test_report_section_for_old_and_new_results_and_the_figure(tmp_path):
    from surfdiff_core.evaluate.plots import phase_envelopes_plot
    from surfdiff_core.stages.evaluate_report import EvaluationResult, markdown_report

    old = EvaluationResult(study="s", run_id="r", config_hash="h", model_id="m", energy_model="emt",
                           training_cost={"structures": 1, "force_calls": 1, "atom_steps": 1})
    assert old.phase_comparison == {}
    assert "surfdiff against RSS" not in markdown_report(old)
    new = EvaluationResult(**{**old.__dict__, "phase_comparison": comparison()})
    report = markdown_report(new)
    assert "## Phase diagram: surfdiff against RSS at the same all-in budget" in report
    assert "| Ag2O1 p(2x2) | [-1.00, +0.00] | [-1.00, +0.00] | not stable |" in report
    assert "RSS at the same budget misses Ag2O1 p(2x2), stable for Δμ_O in [-1.00, +0.00] eV." in report
    assert "The cap binds in Ag12O8 p(4x4), Ag3O1 p(3x3)" in report
    assert "RSS's share buys no relaxation in Ag2O1 p(2x2)" in report
    c = comparison()
    envelopes = {"reference": pc.envelope_segments(c["reference"]),
                 **{a: pc.envelope_segments(v["segments"]) for a, v in c["arms"].items()}}
    path = phase_envelopes_plot(envelopes, tmp_path / "per-arm.png")
    assert path.stat().st_size > 1000


def doc(doc_id: str, *, steps: int, atoms: int, error: str | None = None) -> StructureDoc:
    return StructureDoc.model_construct(doc_id=doc_id, source="relaxed", structure={"sites": [{}] * atoms},
                                        energy=None, steps=steps, in_box=True, error=error, meta={})


def test_stage_glue_prices_every_relaxation_from_the_store(monkeypatch):
    from surfdiff_core.stages import evaluate_report as er

    docs = {d.doc_id: d for d in [doc("g1", steps=9, atoms=5), doc("g2", steps=4, atoms=5, error="boom"),
                                  doc("r1", steps=19, atoms=5), doc("r2", steps=9, atoms=5),
                                  doc("lost", steps=39, atoms=5, error="left")]}
    store = SimpleNamespace(find=lambda crit: [docs[i] for i in crit["doc_id"]["$in"]])
    slab = Atoms("Ag", cell=[2.0, 5.0, 20.0], pbc=True)  # 10 Å²
    monkeypatch.setattr(er, "target_system", lambda cfg, t: SimpleNamespace(template=slab))
    cfg = SimpleNamespace(evaluate=SimpleNamespace(dmu_range=DMU, adsorbate="O"))
    t = er.TargetEvaluation(cell="p(4x4)", composition="Ag12O8", system_id="s", validity={}, n_valid=0,
                            n_distinct=0, uniqueness=0.0, novelty=None, generative_energies=[float("nan"), -9.0],
                            rss_energies=[-10.0, -9.5], speedup=None, steps_generative={}, steps_rss={},
                            relaxed_ids=["g1", "g2"], rss_ids=["r1", "r2"], rss_lost_ids=["lost"])
    result = er.EvaluationResult(study="s", run_id="r", config_hash="h", model_id="m", energy_model="emt",
                                 training_cost={}, targets=[t],
                                 all_in={"training": {"atom_force_calls": 1000.0},
                                         "active_learning": {"atom_force_calls": 25.0}})
    assert er.reference_energy(t) == -10.0
    assert er.phase_comparison_for(cfg, store, result, []) == {}
    line = PhaseLine(t.key, -0.05, -0.10, "Ag12O8", "p(4x4)")
    c = er.phase_comparison_for(cfg, store, result, [line, clean_line()])
    # evaluation: (10 + 5) calls × 5 atoms = 75; RSS: (20 + 10 + 40) × 5 = 350 over 2 that count = 175 each
    assert c["budget"] == {"training": 1000.0, "active_learning": 25.0, "evaluation": 75.0, "total": 1100.0,
                           "targets": 1, "per_target": 1100.0}
    (share,) = c["rss_shares"]
    assert (share["cost_per_relaxation"], share["affordable"], share["k"]) == (175.0, 6, 2)
    # surfdiff's best is 1 eV above the reference: γ(0) up by 0.1 eV/Å², so the phase wins from Δμ = 0.5
    assert c["arms"]["surfdiff"]["segments"][1]["gamma_at_0_eV_per_A2"] == pytest.approx(0.05)
    assert c["arms"]["surfdiff"]["segments"][1]["dmu_min"] == pytest.approx(0.5)
