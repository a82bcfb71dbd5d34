"""Sampling flow: fans out over compositions × cells, guided generation into the store."""

from __future__ import annotations

from prefect import flow, task

from flows.common import flow_run_id, load, publish_results, show_progress
from surfdiff_core.config import SampleTarget, with_overrides
from surfdiff_core.stages.common import (
    latest_checkpoint,
    run_sample,
    sample_targets,
    store_for,
    summary_dict,
    target_system,
)


@task(retries=1, retry_delay_seconds=5)
def sample_task(config_path: str, cell: str, composition: str, checkpoint: str, store_path: str | None,
                overrides: dict, run_id: str | None) -> dict:
    cfg = load(config_path)
    scfg = with_overrides(cfg.sample, overrides)
    with store_for(cfg, store_path) as store:
        s = run_sample(cfg, store, SampleTarget(cell=cell, composition=composition), checkpoint=checkpoint,
                       scfg=scfg, run_id=run_id, progress=show_progress())
    return summary_dict(s)


@flow(name="sample", log_prints=True)
def sample_flow(config_path: str = "configs/demo.yaml", cells: list[str] | None = None,
                compositions: list[str] | None = None, checkpoint: str | None = None, n: int | None = None,
                steps: int | None = None, guidance: bool | None = None, store_path: str | None = None) -> list:
    """Generate structures for every (cell, composition) target with force-field guidance."""
    cfg = load(config_path)
    targets = sample_targets(cfg, cells, compositions)
    for t in targets:  # fail fast on an impossible target, before any sampling
        target_system(cfg, t)
    ckpt = checkpoint or str(latest_checkpoint(cfg, store_path))
    overrides = {"n": n, "steps": steps, "guidance": guidance}
    with_overrides(cfg.sample, overrides)  # validate before work
    run_id = flow_run_id()
    futures = [sample_task.submit(config_path, str(t.cell), t.composition, ckpt, store_path, overrides, run_id)
               for t in targets]
    rows = [f.result() for f in futures]
    for r in rows:
        print(f"{r['composition']} {r['cell']}: {r['n_valid']}/{r['n']} valid, best {r['best_energy']}")
    with store_for(cfg, store_path) as store:
        publish_results(cfg, store, sources=["generated"], title="Generated structures", store_path=store_path)
    return rows
