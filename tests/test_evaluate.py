"""Evaluation library: matching with the substrate as reference, validity, budget curves, γ(Δμ), plots."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT

from surfdiff_core.evaluate import budget, matching, phase, validity
from surfdiff_core.store.documents import StructureDoc, atoms_to_structure_dict

A_AG = 4.06


# ---- fixtures ----------------------------------------------------------------------------------------------
def substrate(size: tuple[int, int, int] = (3, 3, 2)) -> Atoms:
    slab = fcc111("Ag", size=size, a=A_AG, vacuum=6.0, orthogonal=False)
    slab.pbc = [True, True, False]
    return slab


def with_adatoms(slab: Atoms, adatoms: list[tuple[str, float, tuple[float, float] | str]]) -> Atoms:
    out = slab.copy()
    for symbol, height, site in adatoms:
        add_adsorbate(out, symbol, height, site)
    out.wrap()
    return out


def base_slab() -> Atoms:
    """Ag(111) 3×3×2 with O in an fcc and an hcp hollow and an Ag adatom off-site: no symmetry of its own."""
    cell = np.asarray(substrate().cell)[:2, :2]
    hcp_site = (np.array([1 + 2 / 3, 2 / 3]) @ cell / 3).tolist()  # hcp hollow of the primitive cell (1, 0)
    generic = (np.array([0.43, 0.17]) @ cell).tolist()
    return with_adatoms(substrate(), [("O", 1.2, "fcc"), ("O", 1.2, tuple(hcp_site)), ("Ag", 2.2, tuple(generic))])


def make_doc(atoms: Atoms, n_substrate: int, *, energy: float | None = None, doc_id: str = "d",
             system_id: str = "Ag(fcc111)-p(3x3)-L2", **extra) -> StructureDoc:
    symbols = atoms.get_chemical_symbols()[n_substrate:]
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    top = atoms.positions[:n_substrate, 2].max()
    return StructureDoc(
        doc_id=doc_id, source="rss", structure=atoms_to_structure_dict(atoms),
        composition="".join(f"{el}{n}" for el, n in counts.items()), formula=atoms.get_chemical_formula(),
        system_id=system_id, element="Ag", facet="fcc111", cell=system_id.split("-")[1], n_substrate=n_substrate,
        movable=[i >= n_substrate for i in range(len(atoms))], z_box=[top + 0.5, top + 4.0], energy=energy, **extra,
    )


def rotated(atoms: Atoms, angle: float, centre_index: int, first: int = 0) -> Atoms:
    """Rotate atoms[first:] about the vertical axis through atom `centre_index` (first > 0: overlayer only)."""
    out = atoms.copy()
    part = out[first:]
    part.rotate(angle, "z", center=atoms.positions[centre_index])
    out.positions[first:] = part.positions
    out.wrap()
    return out


def mirrored_x(atoms: Atoms, centre_index: int, first: int = 0) -> Atoms:
    """Mirror atoms[first:] in the vertical plane x = x(centre_index)."""
    out = atoms.copy()
    out.positions[first:, 0] = 2 * atoms.positions[centre_index, 0] - atoms.positions[first:, 0]
    out.wrap()
    return out


N_SUB = 18
TOP_ATOM = 9  # an atom of the top layer (fcc111 orders atoms bottom layer first)


# ---- matching ----------------------------------------------------------------------------------------------
def test_symmetry_copies_match_and_wrong_registry_does_not():
    a = base_slab()
    cell = np.asarray(a.cell)
    translated = a.copy()
    translated.translate(cell[0] / 3 + 2 * cell[1] / 3)  # one substrate lattice vector a1 + 2·a2
    translated.wrap()
    shuffled = translated[np.random.default_rng(0).permutation(len(a))]
    assert matching.slabs_match(a, shuffled)
    assert matching.slabs_match(a, rotated(a, 60, TOP_ATOM))  # the whole slab turned: the same structure
    # The overlayer alone moved: equivalent only under operations of the substrate (C3v about a top atom)
    overlayer_shift = a.copy()
    overlayer_shift.positions[N_SUB:] += 2 * cell[0] / 3  # two primitive substrate vectors
    overlayer_shift.wrap()
    assert matching.slabs_match(a, overlayer_shift)
    assert matching.slabs_match(a, rotated(a, 120, TOP_ATOM, first=N_SUB))
    assert matching.slabs_match(a, mirrored_x(a, TOP_ATOM, first=N_SUB))
    half_shift = a.copy()
    half_shift.positions[N_SUB:] += cell[0] / 6  # half a primitive vector: hollow → bridge, wrong registry
    half_shift.wrap()
    assert not matching.slabs_match(a, half_shift)
    # 60° maps the lattice and the top layer onto themselves but swaps fcc and hcp hollows of the
    # second layer: a different registry
    assert not matching.slabs_match(a, rotated(a, 60, TOP_ATOM, first=N_SUB))


def test_dedupe_counts_translated_and_rotated_copies_once():
    a = base_slab()
    translated = a.copy()
    translated.translate(np.asarray(a.cell)[1] / 3)
    translated.wrap()
    half_shift = a.copy()
    half_shift.positions[N_SUB:] += np.asarray(a.cell)[0] / 6
    half_shift.wrap()
    docs = [make_doc(a, N_SUB, energy=-1.0, doc_id="orig"),
            make_doc(translated, N_SUB, energy=-1.01, doc_id="translated"),
            make_doc(rotated(a, 240, TOP_ATOM, first=N_SUB), N_SUB, energy=-0.99, doc_id="rotated"),
            make_doc(half_shift, N_SUB, energy=-0.5, doc_id="wrong-registry")]
    groups = matching.unique_groups(docs)
    assert [[d.doc_id for d in g] for g in groups] == [["translated", "orig", "rotated"], ["wrong-registry"]]
    assert [d.doc_id for d in matching.deduplicate(docs)] == ["translated", "wrong-registry"]
    assert [d.doc_id for d in matching.deduplicate(docs, k=1)] == ["translated"]
    assert matching.uniqueness(docs) == pytest.approx(0.5)


def _random_set(seed: int) -> list[StructureDoc]:
    """Random overlayers on p(2×2) and noisy symmetry copies of them: groups of known size."""
    rng = np.random.default_rng(seed)
    slab = substrate((2, 2, 2))
    n_sub = len(slab)
    cell = np.asarray(slab.cell)
    docs = []
    for b in range(5):
        adatoms = [(s, rng.uniform(1.0, 2.5), tuple((rng.random(2) @ cell[:2, :2]).tolist())) for s in ("O", "O", "Ag")]
        base = with_adatoms(slab, adatoms)
        energy = -float(b)
        copies = [base, rotated(base, 120, 4, first=n_sub), mirrored_x(base, 4, first=n_sub)]
        for c, atoms in enumerate(copies[: 1 + b % 3]):
            noisy = atoms.copy()
            noisy.positions[n_sub:] += rng.normal(0, 0.03, (3, 3))
            docs.append(make_doc(noisy, n_sub, energy=energy + 0.001 * c, doc_id=f"b{b}c{c}",
                                 system_id="Ag(fcc111)-p(2x2)-L2"))
    return docs


def test_prefilter_gives_the_brute_force_grouping():
    docs = _random_set(3)
    fast_stats: dict = {}
    brute_stats: dict = {}
    fast = [[d.doc_id for d in g] for g in matching.unique_groups(docs, prefilter=True, stats=fast_stats)]
    brute = [[d.doc_id for d in g] for g in matching.unique_groups(docs, prefilter=False, stats=brute_stats)]
    assert fast == brute
    # the 4 joins need StructureMatcher either way; the pre-filter spares most of the other pairs
    assert 4 <= fast_stats["matcher_calls"] < brute_stats["matcher_calls"] / 2
    assert sorted(len(g) for g in fast) == [1, 1, 2, 2, 3]  # the copies of each base, nothing more
    # The pre-filter bound: matching structures never have fingerprints further apart than 2·site_tol.
    prints = {d.doc_id: matching.slab_fingerprint(d.to_atoms()) for d in docs}
    for g in fast:
        for x, y in itertools.combinations(g, 2):
            assert np.abs(prints[x] - prints[y]).max() <= 2 * matching.DEFAULT_SITE_TOL


def test_top_k_distinct_stops_early_with_the_same_answer():
    docs = _random_set(3)
    full = [d.doc_id for d in matching.deduplicate(docs)]
    for k in (1, 2, 4, len(full) + 3):
        assert [d.doc_id for d in matching.deduplicate(docs, k=k)] == full[:k]


def test_novelty_and_find_reference():
    a = base_slab()
    other = with_adatoms(substrate(), [("O", 1.2, "hcp"), ("O", 1.2, "ontop"), ("Ag", 2.2, "fcc")])
    reference_docs = [make_doc(a, N_SUB, energy=-1.0, doc_id="train")]
    samples = [make_doc(rotated(a, 120, TOP_ATOM, first=N_SUB), N_SUB, energy=-1.0, doc_id="copy"),
               make_doc(other, N_SUB, energy=-0.7, doc_id="new")]
    assert matching.novel_mask(samples, reference_docs) == [False, True]
    assert matching.novelty(samples, reference_docs) == pytest.approx(0.5)
    elsewhere = [make_doc(a, N_SUB, energy=-1.0, doc_id="train", system_id="Ag(fcc111)-c(2x8)-L2")]
    assert matching.novelty(samples, elsewhere) == 1.0  # no same-cell reference: nothing to compare with
    assert matching.comparable_references(samples, elsewhere) == 0
    assert matching.find_reference([samples[1], samples[0]], a) == 2
    assert matching.find_reference([samples[1]], a) is None


# ---- validity ----------------------------------------------------------------------------------------------
def test_validity_counts_from_fields_and_geometry():
    a = base_slab()
    crowded = a.copy()
    crowded.positions[N_SUB + 1] = crowded.positions[N_SUB] + [0.5, 0.0, 0.0]
    high = a.copy()
    high.positions[-1, 2] += 6.0
    docs = [make_doc(a, N_SUB, doc_id="ok"),
            make_doc(crowded, N_SUB, doc_id="close", valid=False,
                     error="1 pairs closer than 1.00 Å (min 0.500 Å)"),
            make_doc(high, N_SUB, doc_id="high", in_box=False),
            make_doc(a, N_SUB, doc_id="fail", valid=False, error="relaxation failed")]
    for recompute in (False, True):
        (counts,) = validity.validity_counts(docs, recompute=recompute).values()
        assert (counts.total, counts.valid, counts.too_close, counts.outside_box, counts.failed) == (4, 1, 1, 1, 1)
    assert validity.min_overlayer_distance(crowded, N_SUB) == pytest.approx(0.5)
    assert validity.atoms_outside_box(high, N_SUB, docs[0].z_box) == 1


# ---- budget ------------------------------------------------------------------------------------------------
def test_expected_best_of_k_matches_monte_carlo():
    rng = np.random.default_rng(7)
    energies = rng.normal(size=15)
    energies[3] = energies[9]  # ties must not matter
    exact = budget.expected_best_curve(energies)
    simulated = np.mean([budget.running_best(rng.permutation(energies)) for _ in range(20000)], axis=0)
    assert np.abs(exact - simulated).max() < 0.02
    assert exact[0] == pytest.approx(energies.mean()) and exact[-1] == pytest.approx(energies.min())
    low, high = budget.bootstrap_band(energies, n_boot=50)
    # the bootstrap never goes below the observed minimum: the band closes onto it from above at large k
    assert np.all(low <= high) and low[0] < exact[0] < high[0] and low[-1] == pytest.approx(exact[-1])


def test_relaxations_to_reach_and_speedup_on_known_cases():
    in_order = [0.0, -1.0, -0.5, -2.02, -3.0]
    assert budget.relaxations_to_reach(in_order, target=-2.0, tol=0.05) == 4
    assert budget.relaxations_to_reach(budget.running_best(in_order), target=-3.0, tol=0.0) == 5
    assert budget.relaxations_to_reach(in_order, target=-4.0) is None
    rss = [-1.0, 0.0, 0.2, 0.5]
    first_hits = [next(i for i, e in enumerate(p, 1) if e <= -1.0) for p in itertools.permutations(rss)]
    assert budget.expected_relaxations_to_reach(rss, -1.0, 0.05) == pytest.approx(np.mean(first_hits)) == 2.5
    result = budget.speedup(rss, [0.1, -0.97, -2.0], tol=0.05)
    assert (result.target, result.rss_relaxations, result.generative_relaxations) == (-1.0, 2.5, 2)
    assert result.ratio == pytest.approx(1.25)
    assert budget.speedup(rss, [0.3, 0.4]).ratio is None
    # in words: a ratio below 1 is the generative arm needing more relaxations, not "0.8x fewer"
    assert budget.speedup_phrase(result.ratio) == "1.2x fewer oracle relaxations than RSS"
    assert budget.speedup_phrase(0.8) == "1.2x more oracle relaxations than RSS"
    assert budget.speedup_phrase(None) == "RSS's best not reached"
    assert budget.speedup_phrase(1.0) == budget.speedup_phrase(1.04).replace("1.04", "1.00") \
        == "as many oracle relaxations as RSS (1.00x)"
    assert budget.speedup_phrase(1.05) == "1.1x fewer oracle relaxations than RSS"
    assert budget.energy_phrase(-1.23456) == "-1.2346 eV"
    assert budget.energy_phrase(None) == "none (no valid relaxation)"  # never "None eV"


def test_generative_order_and_training_cost():
    a = base_slab()
    generated = [make_doc(a, N_SUB, energy=e, doc_id=f"g{i}") for i, e in enumerate([-3.0, -5.0, -4.0])]
    relaxed = [make_doc(a, N_SUB, energy=e, doc_id=f"r{i}", parent_id=f"g{i}", steps=s)
               for i, e, s in ((0, -10.0, 10), (1, -8.0, None))]
    np.testing.assert_allclose(budget.generative_ranked_energies(generated, relaxed), [-8.0, -10.0])
    cost = budget.training_cost(relaxed)
    assert (cost.structures, cost.force_calls, cost.atom_steps) == (2, 12, 12 * len(a))


def test_mlff_rank_correlation_orders_and_edge_cases():
    a = base_slab()
    generated = [make_doc(a, N_SUB, energy=e, doc_id=f"g{i}") for i, e in enumerate([-3.0, -5.0, -4.0, -1.0])]

    def relaxed(energies):
        return [make_doc(a, N_SUB, energy=e, doc_id=f"r{i}", parent_id=f"g{i}") for i, e in enumerate(energies)]

    assert budget.mlff_rank_correlation(generated, relaxed([-9.0, -11.0, -10.0, -7.0])) == pytest.approx(1.0)
    assert budget.mlff_rank_correlation(generated, relaxed([-11.0, -9.0, -10.0, -12.0])) == pytest.approx(-1.0)
    assert budget.mlff_rank_correlation(generated, relaxed([-9.0, -11.0, -7.0, -10.0])) == pytest.approx(0.2)
    assert budget.mlff_rank_correlation(generated, relaxed([-9.0, -11.0])) is None  # too few pairs
    assert budget.mlff_rank_correlation(generated, relaxed([-9.0, -9.0, -9.0])) is None  # constant


def test_ranking_warning_when_the_mlff_order_is_no_better_than_chance():
    a = base_slab()
    rng = np.random.default_rng(7)
    mlff = np.sort(rng.normal(size=16))

    def arm(oracle, n=16):
        generated = [make_doc(a, N_SUB, energy=float(e), doc_id=f"g{i}") for i, e in enumerate(mlff[:n])]
        relaxed = [make_doc(a, N_SUB, energy=float(e), doc_id=f"r{i}", parent_id=f"g{i}")
                   for i, e in enumerate(oracle[:n])]
        return budget.mlff_rank_correlation(generated, relaxed), budget.mlff_ranking_warning(generated, relaxed)

    rho, warning = arm(mlff + 0.3 * rng.normal(size=16))  # the oracle mostly agrees with the MLFF's order
    assert rho > 0.7 and warning is None
    rho, warning = arm(-mlff)  # the MLFF's best is the oracle's worst
    assert warning is not None and "not significantly better than chance" in warning
    assert "Spearman -1.00 over 16" in warning
    for _ in range(5):  # random orders: warned exactly below the one-sided 5 % critical value at n = 16 (0.43)
        rho, warning = arm(rng.permutation(mlff))
        assert (warning is None) == (rho > 0.43)
    assert arm(-mlff, n=7)[1] is None  # too few relaxed samples to tell


def test_ranking_warning_reaches_the_report():
    from surfdiff_core.stages.evaluate_report import EvaluationResult, TargetEvaluation, markdown_report

    def target(cell, warning):
        return TargetEvaluation(cell=cell, composition="Ag2O1", system_id=cell, validity={"valid": 4, "total": 4},
                                n_valid=4, n_distinct=4, uniqueness=1.0, novelty=None, generative_energies=[1.0],
                                rss_energies=[0.5], speedup=None, steps_generative={}, steps_rss={},
                                ranking_warning=warning)

    result = EvaluationResult(study="s", run_id="r", config_hash="h", model_id="m", energy_model="emt",
                              training_cost={"structures": 1, "force_calls": 1, "atom_steps": 1},
                              targets=[target("p(2x2)", None), target("p(3x3)", "the MLFF ranks ... by chance")])
    assert result.warnings() == ["Ag2O1 p(3x3): the MLFF ranks ... by chance"]
    assert "**Warning**, Ag2O1 p(3x3): the MLFF ranks" in markdown_report(result)
    assert "ranking_warning" not in result.rows()[0]  # the table stays a table


def test_committee_calibration_rewards_a_spread_that_flags_the_errors():
    a = base_slab()
    mlff = [-3.0, -5.0, -4.0, -1.0, -2.0]
    oracle = [-13.0, -15.5, -14.0, -12.0, -11.0]  # offset -10; errors 0, 0.5, 0, 1, 1 eV away from it

    def arm(spreads):
        generated = [make_doc(a, N_SUB, energy=e, doc_id=f"g{i}", meta={"mlff_energy_std": s})
                     for i, (e, s) in enumerate(zip(mlff, spreads, strict=True))]
        relaxed = [make_doc(a, N_SUB, energy=e, doc_id=f"r{i}", parent_id=f"g{i}") for i, e in enumerate(oracle)]
        return budget.committee_calibration(generated, relaxed)

    flags = arm([0.01, 0.2, 0.02, 0.5, 0.4])
    misleads = arm([0.5, 0.2, 0.4, 0.01, 0.02])
    assert flags > 0.8 and misleads < -0.8
    assert arm([0.1] * 5) is None  # no spread to rank by
    assert arm([None] * 5) is None  # no committee


# ---- phase diagram -----------------------------------------------------------------------------------------
def test_gamma_formula_hand_case():
    # (E − E_clean − n_Ag·μ_Ag − n_O·(½E_O2 + Δμ)) / A = (−100 + 90 + 2·3 − 3·(−5 − 1)) / 50 = 14 / 50
    refs = dict(adsorbate="O", adsorbate_reference=-10.0 / 2, bulk_references={"Ag": -3.0})
    gamma = phase.surface_free_energy(-100.0, -90.0, 50.0, "Ag2O3", -1.0, **refs)
    assert gamma == pytest.approx(0.28)
    line = phase.phase_line(-100.0, -90.0, 50.0, {"Ag": 2, "O": 3}, cell="p(3x3)", **refs)
    assert line.slope == pytest.approx(-3 / 50) and line.label == "Ag2O3 p(3x3)"
    with pytest.raises(ValueError, match="Ag"):
        phase.phase_line(-1.0, 0.0, 1.0, "Ag1O1", adsorbate="O", adsorbate_reference=-5.0, bulk_references={})


def test_phase_diagram_lower_envelope_with_known_crossings():
    low_cov = phase.PhaseLine("A", -0.05, -0.05)  # crosses clean at Δμ = −1
    high_cov = phase.PhaseLine("B", -0.05, -0.10)  # crosses A at Δμ = 0
    never = phase.PhaseLine("C", 0.1, -0.05)
    segments = phase.phase_diagram([never, high_cov, phase.clean_line(), low_cov], (-2.0, 1.0))
    assert [s.label for s in segments] == ["clean", "A", "B"]
    bounds = [(s.dmu_min, s.dmu_max) for s in segments]
    np.testing.assert_allclose(bounds, [(-2.0, -1.0), (-1.0, 0.0), (0.0, 1.0)], atol=1e-12)


def test_a_narrow_stability_window_prints_with_distinct_ends():
    # three lines meeting near Δμ = -0.42: the middle phase is stable over 0.6 meV only
    lines = [phase.PhaseLine("A", -0.0420, -0.1), phase.PhaseLine("B", -0.08206, -0.195),
             phase.PhaseLine("C", -0.1230, -0.293)]
    segments = phase.phase_diagram([*lines, phase.clean_line()], (-2.0, 0.5))
    texts = [phase.window_text(s.dmu_min, s.dmu_max) for s in segments]
    assert texts[0] == "-2.00, -0.42" and texts[-1].endswith(", +0.50")
    assert all(lo != hi for lo, hi in (t.split(", ") for t in texts)), texts  # no '[-0.42, -0.42]'
    assert phase.window_text(-0.1, -0.1, " .. ") == "-0.1000 .. -0.1000"  # a point stays a point


def test_lines_from_docs_and_emt_references():
    calc = EMT()
    slab = substrate((2, 2, 2))
    clean = phase.clean_slab_energy(slab, calc, fixed=list(range(4)), steps=50)
    e_o2 = phase.molecule_energy(calc, "O2", steps=100)
    mu_ag = phase.bulk_energy_per_atom("Ag", calc, a=A_AG)
    assert phase.bulk_energy_per_atom("Ag", calc) <= mu_ag + 1e-6  # the EOS minimum lies below any fixed a
    covered = with_adatoms(slab, [("O", 1.2, "fcc")])
    docs = [make_doc(covered, len(slab), energy=e, doc_id=f"x{e}", system_id="Ag(fcc111)-p(2x2)-L2")
            for e in (clean - 3.0, clean - 4.0)]
    (line,) = phase.lines_from_docs(docs, {"Ag(fcc111)-p(2x2)-L2": clean}, adsorbate="O",
                                    adsorbate_reference=e_o2 / 2, bulk_references={"Ag": mu_ag})
    area = phase.surface_area(slab)
    assert line.intercept == pytest.approx((-4.0 - e_o2 / 2) / area)  # the lower-energy document
    assert line.label == "O1 p(2x2)" and np.isfinite(e_o2)


# ---- plots -------------------------------------------------------------------------------------------------
def test_plots_write_png_files(tmp_path):
    from surfdiff_core.evaluate import plots

    rng = np.random.default_rng(0)
    rss, gen = rng.normal(0, 1, 60), rng.normal(-0.5, 0.5, 20)
    lines = [phase.clean_line(), phase.PhaseLine("A", -0.05, -0.05), phase.PhaseLine("B", -0.05, -0.1)]
    paths = [
        plots.energy_distributions({"RSS": rss, "generated": gen}, tmp_path / "hist.png", reference=-2.0),
        plots.best_energy_curves(rss, {"D_lowE": gen}, tmp_path / "budget.png", target=rss.min(), n_boot=20),
        plots.energy_vs_diffusion_steps({10: gen, 50: gen - 1}, {10: gen - 2, 50: gen - 2}, tmp_path / "steps.png"),
        plots.phase_diagram_plot(lines, phase.phase_diagram(lines, (-2, 1)), tmp_path / "phase.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
