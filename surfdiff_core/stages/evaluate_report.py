"""What the evaluation stage hands on: per-target numbers, the phase diagram, figures and a markdown report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surfdiff_core.cells import file_slug
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.stages.common import figure_dir, target_system
from surfdiff_core.stages.results import StageResult
from surfdiff_core.store import ResultsStore


@dataclass
class TargetEvaluation:
    cell: str
    composition: str
    system_id: str
    validity: dict[str, Any]
    n_valid: int
    n_distinct: int
    uniqueness: float
    novelty: float | None  # against training structures of the same cell and composition (None: none exist)
    generative_energies: list[float]  # oracle energies in the product's ranking order (MLFF energy)
    rss_energies: list[float]  # oracle energies of RSS in the same cell, in run order
    speedup: dict[str, Any] | None
    steps_generative: dict[str, float]
    steps_rss: dict[str, float]
    reference_rank: int | None = None
    active_learning_labels: int = 0  # oracle relaxations in this cell spent on labels: the arm's first entries
    active_learning_single_points: int = 0  # oracle single points in this cell spent on labels
    single_point_charge: int = 0  # the relaxations those are worth in force calls: the next entries, empty
    sample_runs: list[str] = field(default_factory=list)  # the sample runs whose structures were judged
    mlff_rank_correlation: float | None = None  # Spearman, MLFF energy against relaxed oracle energy
    committee_calibration: float | None = None  # Spearman, committee spread against the MLFF's error size
    ranking_warning: str | None = None  # set when the MLFF's order of the relaxed samples is no better than chance
    relaxed_ids: list[str] = field(default_factory=list)
    rss_ids: list[str] = field(default_factory=list)  # RSS relaxations that can count: finished, in the box
    rss_lost_ids: list[str] = field(default_factory=list)  # RSS relaxations that failed or left the box: spent
    generative_lost: int = 0  # labels and relaxations of the generative arm that failed or left the box
    # oracle cost in force calls (surfdiff_core.evaluate.cost.TargetCost.as_dict): RSS expected, own until hit,
    # the per-target ratio per unit; empty in results made before it was counted
    cost: dict[str, Any] = field(default_factory=dict)
    one_target_all_in: dict[str, float | None] = field(default_factory=dict)  # per unit, as if the only target
    # oracle relaxations of either arm whose job was lost on an executor (id -> why): not stored, not counted;
    # a rerun redoes them
    lost: dict[str, str] = field(default_factory=dict)
    relax_reused: int = 0  # of the relaxations, the relax stage's (not relaxed again; among relaxed_ids)

    @property
    def key(self) -> str:
        return f"{self.composition} {self.cell}"

    def best(self) -> tuple[float | None, float | None]:
        def low(e: list[float]) -> float | None:
            finite = [x for x in e if np.isfinite(x)]
            return min(finite) if finite else None

        return low(self.generative_energies), low(self.rss_energies)


@dataclass
class EvaluationResult(StageResult):
    model_id: str
    energy_model: str
    training_cost: dict[str, Any]
    targets: list[TargetEvaluation] = field(default_factory=list)
    phase_diagram: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    # the sweep's all-in comparison (surfdiff_core.evaluate.cost.AllIn.as_dict); empty in older results
    all_in: dict[str, Any] = field(default_factory=dict)
    # the phase diagram each arm concludes at the same all-in budget, against the reference envelope
    # (surfdiff_core.evaluate.phase_compare.phase_comparison); empty in older results
    phase_comparison: dict[str, Any] = field(default_factory=dict)
    relax_reused: int = 0  # relax-stage relaxations used in place of the evaluation's own, over the targets
    relax_reuse_refused: str | None = None  # why a relax result passed in was not reused (other relaxer settings)

    def warnings(self) -> list[str]:
        """What a user should act on, one line per target."""
        return ([f"{t.key}: {t.ranking_warning}" for t in self.targets if t.ranking_warning]
                + [f"{t.key}: {len(t.lost)} oracle relaxation(s) lost on the executor, not counted (rerun to redo "
                   f"them); the first: {next(iter(t.lost.values()))}" for t in self.targets if t.lost])

    def rows(self) -> list[dict[str, Any]]:
        """One table row per target: what a user reads first."""
        from surfdiff_core.evaluate.cost import HEADLINE

        out = []
        for t in self.targets:
            gen, rss = t.best()
            sp = t.speedup or {}
            def r4(x: float | None) -> float | None:
                return None if x is None else round(float(x), 4)

            out.append({
                "target": t.key, "valid": f"{t.validity['valid']}/{t.validity['total']}",
                "unique": round(t.uniqueness, 3), "novel": None if t.novelty is None else round(t.novelty, 3),
                "best_generative_eV": r4(gen), "best_rss_eV": r4(rss),
                "rss_relaxations": len(t.rss_energies) + len(t.rss_lost_ids),
                "generative_relaxations": len(t.generative_energies),
                "generative_to_reach_rss_best": sp.get("generative_relaxations"),
                "rss_expected_to_reach": r4(sp.get("rss_relaxations")), "speedup": r4(sp.get("ratio")),
                "speedup_atom_weighted": r4((t.cost.get("ratio") or {}).get(HEADLINE)),
                "one_target_all_in": r4(t.one_target_all_in.get(HEADLINE)),
                "steps_generative_median": t.steps_generative.get("median"),
                "steps_rss_median": t.steps_rss.get("median"), "reference_rank": t.reference_rank,
                "active_learning_labels": t.active_learning_labels,
                "active_learning_single_points": t.active_learning_single_points,
                "single_point_charge": t.single_point_charge,
                "mlff_rank_correlation": r4(t.mlff_rank_correlation),
                "committee_calibration": r4(t.committee_calibration), "sample_runs": ", ".join(t.sample_runs),
            })
        return out


def phase_lines_for(cfg: SurfdiffConfig, store: ResultsStore, result: EvaluationResult, calculator) -> list:
    """γ(Δμ) lines of the best structure (either arm: the generative arm's active-learning labels and
    relaxations, RSS's relaxations, each only if it can count) of every evaluated composition and cell, named
    by the target's key, plus the clean surface; [] when no target holds the adsorbate. References use the
    same energy model (surfdiff_core.evaluate.references). (`store` is unused: the energies are the result's.)"""
    from surfdiff_core.config import SampleTarget
    from surfdiff_core.evaluate.phase import clean_line
    from surfdiff_core.evaluate.references import holds_adsorbate, phase_references

    if not holds_adsorbate(cfg, [t.composition for t in result.targets]):
        return []
    found = [(t, reference_energy(t)) for t in result.targets]
    systems = {t.key: target_system(cfg, SampleTarget(cell=t.cell, composition=t.composition))
               for t, best in found if best is not None}
    if not systems:
        return []
    refs = phase_references(cfg, calculator, systems.values())
    lines = [refs.line(best, systems[t.key], label=t.key) for t, best in found if best is not None]
    return [*lines, clean_line()]


def reference_energy(t: TargetEvaluation) -> float | None:
    """The lowest energy either arm found in the target that can count (NaN entries cannot)."""
    from surfdiff_core.evaluate.phase_compare import best_energy

    return best_energy([*t.generative_energies, *t.rss_energies])


def phase_comparison_for(cfg: SurfdiffConfig, store: ResultsStore, result: EvaluationResult, lines: list) -> dict:
    """What surfdiff's sweep and RSS's sweep at the same all-in budget conclude about the phase diagram
    (surfdiff_core.evaluate.phase_compare), from `lines` (phase_lines_for's reference lines) and the costs of
    the documents the result names; {} without lines or without the all-in cost (older results)."""
    from surfdiff_core.config import SampleTarget
    from surfdiff_core.evaluate.cost import HEADLINE, total_cost
    from surfdiff_core.evaluate.phase import surface_area
    from surfdiff_core.evaluate.phase_compare import TargetPhase, best_energy, phase_comparison, sweep_budget

    if not lines or not result.all_in:
        return {}

    def cost_of(ids: list[str]) -> float:
        docs = list(store.find({"doc_id": {"$in": ids}})) if ids else []
        return getattr(total_cost(docs), HEADLINE)

    by_label = {ln.label: ln for ln in lines}
    targets = []
    for t in result.targets:
        system = target_system(cfg, SampleTarget(cell=t.cell, composition=t.composition))
        targets.append(TargetPhase(
            label=t.key, line=by_label.get(t.key), reference_energy=reference_energy(t),
            area=surface_area(system.template), generative_best=best_energy(t.generative_energies),
            rss_energies=tuple(e for e in t.rss_energies if np.isfinite(e)),
            rss_cost=cost_of([*t.rss_ids, *t.rss_lost_ids])))
    budget = sweep_budget(result.all_in, sum(cost_of(t.relaxed_ids) for t in result.targets))
    return phase_comparison(targets, budget, cfg.evaluate.dmu_range, adsorbate=cfg.evaluate.adsorbate)


def phase_rows(lines: list, dmu_range: tuple[float, float]) -> list[dict[str, Any]]:
    """The lowest line per Δμ range, its phase named."""
    from surfdiff_core.evaluate.phase import phase_diagram

    if not lines:
        return []
    return [{"phase": s.label, "dmu_min": s.dmu_min, "dmu_max": s.dmu_max,
             "gamma_at_0_eV_per_A2": s.line.intercept, "slope": s.line.slope}
            for s in phase_diagram(lines, dmu_range)]


def write_figures(cfg: SurfdiffConfig, result: EvaluationResult, lines: list) -> dict[str, str]:
    from surfdiff_core.evaluate.phase import PhaseSegment
    from surfdiff_core.evaluate.phase_compare import ARMS, envelope_segments
    from surfdiff_core.evaluate.plots import (
        best_energy_curves,
        energy_distributions,
        phase_diagram_plot,
        phase_envelopes_plot,
    )

    out: dict[str, str] = {}
    d = figure_dir(cfg) / "evaluation"
    for t in result.targets:
        slug = file_slug(t.composition, t.cell)
        gen = [e for e in t.generative_energies if np.isfinite(e)]
        if gen or t.rss_energies:
            out[f"{t.key} energies"] = str(energy_distributions(
                {"generated + relaxed": gen, "RSS": t.rss_energies}, d / f"{slug}-energies.png",
                title=f"{cfg.name}: {t.key}, {result.energy_model}"))
        if t.rss_energies and gen:
            out[f"{t.key} budget"] = str(best_energy_curves(
                t.rss_energies, {"surfdiff": t.generative_energies}, d / f"{slug}-best-vs-budget.png",
                title=f"{cfg.name}: {t.key}", tol=cfg.evaluate.tol))
    if result.phase_diagram and lines:
        segments = [PhaseSegment(s["phase"], s["dmu_min"], s["dmu_max"],
                                 next(ln for ln in lines if ln.label == s["phase"])) for s in result.phase_diagram]
        out["phase diagram"] = str(phase_diagram_plot(lines, segments, d / "phase-diagram.png",
                                                      adsorbate=cfg.evaluate.adsorbate,
                                                      title=f"{cfg.name}: γ(Δμ_{cfg.evaluate.adsorbate})"))
    comparison = result.phase_comparison
    if comparison:
        envelopes = {"reference (best of both arms)": envelope_segments(comparison["reference"]),
                     **{ARMS[arm]: envelope_segments(c["segments"]) for arm, c in comparison["arms"].items()}}
        out["phase diagram per arm"] = str(phase_envelopes_plot(
            envelopes, d / "phase-diagram-per-arm.png", adsorbate=cfg.evaluate.adsorbate,
            title=f"{cfg.name}: γ(Δμ_{cfg.evaluate.adsorbate}) lower envelopes, RSS at surfdiff's all-in budget"))
    return out


def _x(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def all_in_line(all_in: dict[str, Any], unit: str = "atom_force_calls") -> str:
    """The sweep's all-in ratio in words ("3.2x fewer atom-weighted oracle force calls than RSS")."""
    from surfdiff_core.evaluate.cost import cost_phrase

    return cost_phrase((all_in.get("ratio") or {}).get(unit), unit,
                       reached=(all_in.get("reached", 0), all_in.get("targets", 0)))


def all_in_summary(all_in: dict[str, Any]) -> str:
    """One line for a terminal: the sweep's all-in ratio, the other units beside it."""
    ratios = all_in.get("ratio") or {}
    line = f"all-in (training data counted): {all_in_line(all_in)}"
    if ratios.get("force_calls") is None:
        return line
    beside = "; ".join(f"{w}: {_times(ratios.get(u))}" for u, w in (("force_calls", "force calls"),
                                                                    ("atom3_force_calls", "atoms³-weighted")))
    return f"{line} ({beside})"


def _times(ratio: float | None) -> str:
    """A ratio in the headline's words: "3.2x fewer", "1.4x more" (RSS's cost over surfdiff's)."""
    from surfdiff_core.evaluate.cost import ratio_phrase

    return "not reached" if ratio is None else ratio_phrase(ratio)


def cost_section(result: EvaluationResult) -> list[str]:
    """The oracle-cost table (per target) and the sweep's all-in line, in markdown; [] for older results."""
    from surfdiff_core.evaluate.cost import HEADLINE
    from surfdiff_core.report import markdown_table

    a = result.all_in
    if not a:
        return []
    rows = [{"target": t.key, "per-target (relaxations)": _x((t.speedup or {}).get("ratio")),
             "per-target (atom-weighted)": _x((t.cost.get("ratio") or {}).get(HEADLINE)),
             "one-target all-in (atom-weighted)": _x(t.one_target_all_in.get(HEADLINE))} for t in result.targets]
    ratios = a["ratio"]
    spent = ", ".join(f"{a['rss_expected'][u]:.4g} / {a['generative'][u]:.4g} {w} ({_x(ratios[u])})"
                    for u, w in (("force_calls", "force calls"), (HEADLINE, "atom-weighted"),
                                 ("atom3_force_calls", "atoms³-weighted")) if ratios[u] is not None)
    return ["\n## Oracle cost against RSS\n",
            "Force calls: steps + 1 per relaxation, 1 per single point; atom-weighted: force calls × atoms (the "
            "headline), atoms³-weighted: × atoms³ (DFT-like). Ratios are RSS's expected cost to reach its best "
            "in the target cell (random order) over surfdiff's. Per target: the target's own oracle calls "
            "(active-learning labels and single points in the order they were spent, then the evaluation's "
            "relaxations in MLFF rank order) until the first hit. One-target all-in: plus the training data "
            "and every active-learning call of every target, as if this had been the only target. In both "
            "arms a relaxation that failed or left the box is counted but never a hit.\n",
            markdown_table(rows, list(rows[0])) if rows else "no targets",
            f"\n**All-in over the sweep** (training data counted): {all_in_line(a)}. "
            + (f"RSS expected / surfdiff: {spent}. " if spent else "")
            + f"Training data {a['training'][HEADLINE]:.4g} and active learning "
            f"{a['active_learning'][HEADLINE]:.4g} atom-weighted force calls; {a['reached']} of {a['targets']} "
            "targets reached.\n"]


def pretrained_sentence(shipped: dict) -> str:
    return (f"The model descends from the shipped pretrained model {shipped['name']}: its training data "
            f"({shipped.get('structures')} structures, {shipped['force_calls']:.0f} oracle force calls, "
            f"{shipped['atom_force_calls']:.4g} atom-weighted) is charged in full to the all-in ratios below.\n")


def markdown_report(result: EvaluationResult) -> str:
    from surfdiff_core.evaluate.phase_compare import comparison_section
    from surfdiff_core.report import markdown_table, png_markdown

    rows = result.rows()
    cost = result.training_cost
    parts = [f"# Evaluation of {result.study} (model {result.model_id}, {result.energy_model})\n",
             f"Training data cost: {cost['structures']} structures, {cost['force_calls']} oracle force calls, "
             f"{cost['atom_steps']} atom-steps ({cost.get('active_learning_labels', 0)} of the structures are "
             f"active-learning relaxations and {cost.get('active_learning_single_points', 0)} active-learning "
             f"single points in the target cells). The budgets below count oracle relaxations in the target cell; "
             f"single points there are charged as the relaxations their force calls would buy.\n",
             *([pretrained_sentence(cost["pretrained"])] if cost.get("pretrained") else []),
             markdown_table(rows, list(rows[0])) if rows else "no targets", *cost_section(result)]
    parts += [f"\n**Warning**, {w}\n" for w in result.warnings()]
    if result.relax_reused or result.relax_reuse_refused:  # whether the relax stage's relaxations counted here
        parts.append(f"\nNote: {result.relax_reuse_refused}.\n" if result.relax_reuse_refused else
                     f"\n{result.relax_reused} of the generative arm's relaxations are the relax stage's (same "
                     f"relaxer): not relaxed again, counted as the evaluation's own.\n")
    if result.phase_diagram:
        parts.append("\n## Phase diagram γ(Δμ)\n")
        parts.append(markdown_table(result.phase_diagram, list(result.phase_diagram[0])))
    parts += comparison_section(result.phase_comparison)
    for name, path in result.figures.items():
        if Path(path).exists():
            parts.append(f"\n## {name}\n\n{png_markdown(Path(path), name)}\n")
    return "\n".join(parts)
