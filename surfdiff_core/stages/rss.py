"""RSS stage: random structures relaxed with the study's oracle, the training data (resumable)."""

from __future__ import annotations

from concurrent.futures import Executor

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.rss import run_rss
from surfdiff_core.stages.common import new_run_id, training_system
from surfdiff_core.stages.results import RSSResult
from surfdiff_core.store import ResultsStore


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: None = None, *, n: int | None = None,
        seed: int | None = None, workers: int | None = None, run_id: str | None = None, progress: bool = True,
        executor: Executor | None = None) -> RSSResult:
    run_id = run_id or new_run_id()
    report = run_rss(cfg, store, n=n, seed=seed, workers=workers, run_id=run_id, progress=progress,
                     executor=executor)
    return RSSResult(
        study=cfg.name, run_id=run_id, config_hash=cfg.section_hash("substrate", "confinement", "oracle", "rss"),
        system_id=training_system(cfg).system_id, energy_model=cfg.oracle.energy_model, planned=report.planned,
        done=report.done, skipped=report.skipped, failed=report.failed, retried=report.retried,
        given_up=report.given_up, out_of_box=report.out_of_box, by_others=report.by_others,
        per_minute=report.per_minute, wall_time=report.wall_time, best=report.best, lost=report.lost,
        doc_ids=report.doc_ids,
    )
