"""What a finished discovery run leaves for people: the evaluation report, the figures and the best structures."""

from __future__ import annotations

from pathlib import Path

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.stages.common import data_root, figure_dir, sample_targets, target_system
from surfdiff_core.stages.evaluate_report import EvaluationResult, markdown_report
from surfdiff_core.store import ResultsStore


def results_dir(cfg: SurfdiffConfig) -> Path:
    return data_root(cfg) / "results" / cfg.name


def write_run_outputs(cfg: SurfdiffConfig, store: ResultsStore, evaluation: EvaluationResult | None) -> dict:
    """report.md (when evaluated) and best.extxyz, the lowest oracle-relaxed structure of every target that has
    one, under results/<study>/ beside the store; the paths, for the run's last lines."""
    from surfdiff_core.evaluate.cost import can_hit
    from surfdiff_core.export import export_docs
    from surfdiff_core.query import best_per_group

    out = results_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {"figures": str(figure_dir(cfg))}
    if evaluation is not None:
        report = out / "report.md"
        tmp = report.with_suffix(".tmp")
        tmp.write_text(markdown_report(evaluation))
        tmp.replace(report)
        paths["report"] = str(report)
    best = []
    for target in sample_targets(cfg):
        system = target_system(cfg, target)
        docs = [d for d in store.find({"study": cfg.name, "source": "relaxed", "system_id": system.system_id,
                                       "composition": system.composition,
                                       "energy_model": cfg.oracle.energy_model})
                if can_hit(d)]
        best += [d for group in best_per_group(docs).values() for d in group]
    if best:
        paths["best"] = str(export_docs(best, out / "best.extxyz"))
        paths["best_energies"] = {f"{d.composition} {d.cell}": round(float(d.energy), 4) for d in best}
    return paths
