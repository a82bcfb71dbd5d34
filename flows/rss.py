"""RSS flow: random structures relaxed with the oracle, written to the store (resumable)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task

from flows.common import flow_run_id, load, publish_results, show_progress
from surfdiff_core.rss import run_rss
from surfdiff_core.stages.common import store_for


@task(retries=2, retry_delay_seconds=5)
def rss_task(config_path: str, n: int | None, seed: int | None, workers: int | None,
             store_path: str | None, run_id: str | None) -> dict:
    cfg = load(config_path)
    with store_for(cfg, store_path) as store:
        report = run_rss(cfg, store, n=n, seed=seed, workers=workers, run_id=run_id, progress=show_progress())
    return {**asdict(report), "per_minute": report.per_minute}


@flow(name="rss", log_prints=True)
def rss_flow(config_path: str = "configs/demo.yaml", n: int | None = None, seed: int | None = None,
             workers: int | None = None, store_path: str | None = None) -> dict:
    """Random structure search: training data for the diffusion model."""
    cfg = load(config_path)  # validated once, before any work
    report = rss_task(config_path, n, seed, workers, store_path, flow_run_id())
    with store_for(cfg, store_path) as store:
        publish_results(cfg, store, sources=["rss"], title="RSS training data", store_path=store_path)
    print(f"RSS: {report['done']} relaxed, {report['skipped']} reused, {report['failed']} failed")
    return report
