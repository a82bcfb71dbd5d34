"""Sampling flow: fans out over compositions × cells, guided generation into the store."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task

from flows.common import flow_run_id, publish_results, resolve_study, show_progress
from surfdiff_core.config import SampleConfig, SampleTarget, SurfdiffConfig, with_overrides
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import sample
from surfdiff_core.stages.common import new_run_id, open_study_store, sample_targets, target_system
from surfdiff_core.stages.results import SampleResult, TargetSamples, TrainResult
from surfdiff_core.store.models import ModelRecord


@task(retries=1, retry_delay_seconds=5)
def sample_task(cfg: SurfdiffConfig, target: SampleTarget, model: ModelRecord, scfg: SampleConfig,
                run_id: str, spec: ExecutorSpec) -> TargetSamples:
    if spec.on_slurm:  # one GPU job per target (the settings' GRES) on the cluster
        from deploy.slurm import run_stage_as_job

        return run_stage_as_job("sample", spec, cfg, "sample", target, model, scfg=scfg, run_id=run_id)
    with open_study_store(cfg) as store:
        return sample.sample_one(cfg, store, target, model, scfg=scfg, run_id=run_id, progress=show_progress())


@task(retries=1, retry_delay_seconds=5)
def shared_task(cfg: SurfdiffConfig, targets: list[SampleTarget], model: ModelRecord, scfg: SampleConfig,
                run_id: str) -> list[TargetSamples]:
    with open_study_store(cfg) as store:
        return sample.sample_targets_shared(cfg, store, targets, model, scfg=scfg, run_id=run_id,
                                            progress=show_progress())


@flow(name="sample", log_prints=True)
def sample_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                upstream: TrainResult | None = None, model_id: str | None = None, cells: list[str] | None = None,
                compositions: list[str] | None = None, n: int | None = None, steps: int | None = None,
                guidance: bool | None = None, store_path: str | None = None,
                executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None) -> SampleResult:
    """Generate structures for every (cell, composition) target with force-field guidance.
    executor="slurm": one Slurm GPU job per target (settings: the `hpc_settings` file, SURFDIFF_HPC_*)."""
    cfg = resolve_study(study, config_path, store_path)
    spec = ExecutorSpec(executor, hpc_settings)
    targets = sample_targets(cfg, cells, compositions)
    for t in targets:  # fail fast on an impossible target, before any sampling
        target_system(cfg, t)
    scfg = with_overrides(cfg.sample, {"n": n, "steps": steps, "guidance": guidance})
    if scfg.inpaint is not None or scfg.seed_structure is not None:  # bad sources: one line before any sampling
        with open_study_store(cfg) as store:
            sample.check_conditioning(cfg, store, targets, scfg)
    model = sample.resolve_model(cfg, upstream, model_id)
    run_id = flow_run_id() or new_run_id()
    if scfg.share_batches and not spec.on_slurm:  # one stream of batches over every target
        done = shared_task(cfg, targets, model, scfg, run_id)
    else:
        futures = [sample_task.submit(cfg, t, model, scfg, run_id, spec) for t in targets]
        done = [f.result() for f in futures]
    result = SampleResult(study=cfg.name, run_id=run_id, config_hash=cfg.section_hash("sample"),
                          model_id=model.model_id, checkpoint=model.checkpoint, targets=done)
    for r in result.targets:
        reused = (f"; {r.reused_batches} of {r.batches} batches already in the store (run "
                  f"{', '.join(r.reused_runs) or '?'})" if r.reused_batches else "")
        print(f"{r.composition} {r.cell}: {r.n_valid}/{r.n} valid, best {r.best_energy}{reused}")
    with open_study_store(cfg) as store:
        publish_results(cfg, store, doc_ids=result.doc_ids, title="Generated structures")
    return result
