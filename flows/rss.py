"""RSS flow: random structures relaxed with the oracle, written to the store (resumable)."""

from __future__ import annotations

from prefect import flow, task

from flows.common import flow_run_id, publish_results, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.stages import rss
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.results import RSSResult


@task(retries=2, retry_delay_seconds=5)
def rss_task(cfg: SurfdiffConfig, n: int | None, seed: int | None, workers: int | None,
             run_id: str | None) -> RSSResult:
    with open_study_store(cfg) as store:
        return rss.run(cfg, store, n=n, seed=seed, workers=workers, run_id=run_id, progress=show_progress())


@flow(name="rss", log_prints=True)
def rss_flow(study: SurfdiffConfig | None = None, config_path: str | None = None, n: int | None = None,
             seed: int | None = None, workers: int | None = None, store_path: str | None = None) -> RSSResult:
    """Random structure search: training data for the diffusion model."""
    cfg = resolve_study(study, config_path, store_path)
    result = rss_task(cfg, n, seed, workers, flow_run_id())
    with open_study_store(cfg) as store:
        publish_results(cfg, store, doc_ids=result.doc_ids, title="RSS training data")
    print(f"RSS ({cfg.name}): {result.done} relaxed, {result.skipped} reused, {result.failed} failed")
    return result
