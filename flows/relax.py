"""Relaxation flow: the best K distinct candidates per composition/cell through jobflow (atomate2 makers)."""

from __future__ import annotations

from prefect import flow, task

from flows.common import flow_run_id, publish_results, resolve_study
from surfdiff_core.config import RelaxConfig, SurfdiffConfig, with_overrides
from surfdiff_core.stages import relax
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.results import RelaxResult, SampleResult


@task(retries=1, retry_delay_seconds=10)
def relax_task(cfg: SurfdiffConfig, upstream: SampleResult | None, rcfg: RelaxConfig, model_id: str | None,
               run_id: str | None) -> RelaxResult:
    with open_study_store(cfg) as store:
        return relax.run(cfg, store, upstream, rcfg=rcfg, model_id=model_id, run_id=run_id)


@flow(name="relax", log_prints=True)
def relax_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
               upstream: SampleResult | None = None, top_k: int | None = None, method: str | None = None,
               model_id: str | None = None, store_path: str | None = None) -> RelaxResult:
    """Relax the best generated candidates with the oracle / DFT (EMT, CHGNet, SevenNet, GPAW, VASP)."""
    cfg = resolve_study(study, config_path, store_path)
    rcfg = with_overrides(cfg.relax, {"top_k": top_k, "method": method})  # validated before work
    s = relax_task(cfg, upstream, rcfg, model_id, upstream.run_id if upstream else flow_run_id())
    with open_study_store(cfg) as store:
        publish_results(cfg, store, doc_ids=s.doc_ids, title="Relaxed candidates")
    print(f"relax ({s.method}): {s.relaxed} relaxed, {s.skipped} reused, {s.failed} failed")
    return s
