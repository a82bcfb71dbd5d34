"""Relaxation flow: the best K generated candidates per composition/cell through jobflow (atomate2 makers)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task

from flows.common import flow_run_id, load, publish_results
from surfdiff_core.config import with_overrides
from surfdiff_core.stages.common import store_for
from surfdiff_core.stages.relax import run_relax


@task(retries=1, retry_delay_seconds=10)
def relax_task(config_path: str, store_path: str | None, overrides: dict, run_id: str | None) -> dict:
    cfg = load(config_path)
    rcfg = with_overrides(cfg.relax, overrides)
    with store_for(cfg, store_path) as store:
        s = run_relax(cfg, store, rcfg=rcfg, run_id=run_id, store_path=store_path)
    return asdict(s)


@flow(name="relax", log_prints=True)
def relax_flow(config_path: str = "configs/demo.yaml", top_k: int | None = None, method: str | None = None,
               store_path: str | None = None) -> dict:
    """Relax the best generated candidates with the oracle / DFT (EMT, CHGNet, SevenNet, GPAW, VASP)."""
    cfg = load(config_path)
    overrides = {"top_k": top_k, "method": method}
    with_overrides(cfg.relax, overrides)  # validate before work
    s = relax_task(config_path, store_path, overrides, flow_run_id())
    with store_for(cfg, store_path) as store:
        publish_results(cfg, store, sources=["relaxed", "dft"], title="Relaxed candidates", store_path=store_path)
    print(f"relax ({s['method']}): {s['relaxed']} relaxed, {s['skipped']} reused, {s['failed']} failed")
    return s
