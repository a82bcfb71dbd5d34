"""Relaxation flow: the best K distinct candidates per composition/cell through jobflow (atomate2 makers)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task

from flows.common import flow_run_id, publish_results, resolve_study
from surfdiff_core.config import RelaxConfig, SurfdiffConfig, with_overrides
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import relax
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.results import RelaxResult, SampleResult


@task(retries=1, retry_delay_seconds=10)
def relax_task(cfg: SurfdiffConfig, upstream: SampleResult | None, rcfg: RelaxConfig, model_id: str | None,
               run_id: str | None, spec: ExecutorSpec) -> RelaxResult:
    from deploy.slurm import open_executor

    with open_executor(spec, "relax") as ex, open_study_store(cfg) as store:
        return relax.run(cfg, store, upstream, rcfg=rcfg, model_id=model_id, run_id=run_id, executor=ex)


@flow(name="relax", log_prints=True)
def relax_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
               upstream: SampleResult | None = None, top_k: int | None = None, method: str | None = None,
               model_id: str | None = None, store_path: str | None = None,
               executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None) -> RelaxResult:
    """Relax the best generated candidates with the oracle / DFT (EMT, CHGNet, SevenNet, GPAW, VASP).
    executor="slurm": one Slurm job per candidate or batch (settings: `hpc_settings` file, SURFDIFF_HPC_*)."""
    cfg = resolve_study(study, config_path, store_path)
    rcfg = with_overrides(cfg.relax, {"top_k": top_k, "method": method})  # validated before work
    s = relax_task(cfg, upstream, rcfg, model_id, upstream.run_id if upstream else flow_run_id(),
                   ExecutorSpec(executor, hpc_settings))
    with open_study_store(cfg) as store:
        publish_results(cfg, store, doc_ids=s.doc_ids, title="Relaxed candidates")
    print(f"relax ({s.method}): {s.relaxed} relaxed, {s.skipped} reused, {s.failed} failed"
          + (f" ({len(s.lost)} jobs lost: rerun to redo them)" if s.lost else ""))
    return s
