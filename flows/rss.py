"""RSS flow: random structures relaxed with the oracle, written to the store (resumable)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task

from flows.common import flow_run_id, publish_results, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import rss
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.results import RSSResult


@task(retries=2, retry_delay_seconds=5)
def rss_task(cfg: SurfdiffConfig, n: int | None, seed: int | None, workers: int | None,
             run_id: str | None, spec: ExecutorSpec) -> RSSResult:
    from deploy.slurm import open_executor

    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        return rss.run(cfg, store, n=n, seed=seed, workers=workers, run_id=run_id, progress=show_progress(),
                       executor=ex)


@flow(name="rss", log_prints=True)
def rss_flow(study: SurfdiffConfig | None = None, config_path: str | None = None, n: int | None = None,
             seed: int | None = None, workers: int | None = None, store_path: str | None = None,
             executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None) -> RSSResult:
    """Random structure search: training data for the diffusion model. executor="slurm": one Slurm job per
    structure or batch, settings from the file `hpc_settings` (deploy/hpc/slurm.yaml) and SURFDIFF_HPC_*."""
    cfg = resolve_study(study, config_path, store_path)
    result = rss_task(cfg, n, seed, workers, flow_run_id(), ExecutorSpec(executor, hpc_settings))
    with open_study_store(cfg) as store:
        publish_results(cfg, store, doc_ids=result.doc_ids, title="RSS training data")
    print(f"RSS ({cfg.name}): {result.done} relaxed, {result.skipped} reused, {result.failed} failed")
    return result
