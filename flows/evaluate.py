"""Evaluation flow: discovery power against RSS in each target cell, stoichiometries compared (γ(Δμ))."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import artifact_key, flow_run_id, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.evaluate.budget import energy_phrase, speedup_phrase
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import evaluate
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.evaluate_report import EvaluationResult, markdown_report
from surfdiff_core.stages.results import RelaxResult, SampleResult


@task(retries=1, retry_delay_seconds=10)
def evaluate_task(cfg: SurfdiffConfig, upstream: SampleResult | None, model_id: str | None,
                  run_id: str | None, sample_run: str | None = None,
                  spec: ExecutorSpec = ExecutorSpec(), relaxed: RelaxResult | None = None) -> EvaluationResult:
    from deploy.slurm import open_executor

    # the evaluation's relaxations are RSS-like (in-process oracle, rss settings): "rss" jobs
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        return evaluate.run(cfg, store, upstream, model_id=model_id, run_id=run_id, sample_run=sample_run,
                            progress=show_progress(), executor=ex, relaxed=relaxed)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                  upstream: SampleResult | None = None, model_id: str | None = None,
                  store_path: str | None = None, sample_run: str | None = None,
                  executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None,
                  relaxed: RelaxResult | None = None) -> EvaluationResult:
    """Generative arm against RSS at equal oracle budget, sample quality, and the γ(Δμ) phase diagram.
    Without `upstream`: the samples of `sample_run`, or else those the study's sample section makes.
    executor="slurm": both arms' oracle relaxations as Slurm jobs, one per structure or batch (settings: the
    `hpc_settings` file, SURFDIFF_HPC_*). `relaxed` (the relax stage's result): its relaxations made as the
    evaluation's are not made again."""
    cfg = resolve_study(study, config_path, store_path)
    result = evaluate_task(cfg, upstream, model_id, upstream.run_id if upstream else flow_run_id(), sample_run,
                           ExecutorSpec(executor, hpc_settings), relaxed)
    rows = result.rows()
    if rows:
        create_table_artifact(key=artifact_key(f"{cfg.name}-evaluation"), table=rows,
                              description="Generative arm against RSS in the same cell, per target")
    if result.phase_diagram:
        create_table_artifact(key=artifact_key(f"{cfg.name}-phase-diagram"), table=result.phase_diagram,
                              description="Most stable phase per Δμ range")
    create_markdown_artifact(key=artifact_key(f"{cfg.name}-evaluation-report"), markdown=markdown_report(result),
                             description=f"Evaluation of {cfg.name}")
    for r in rows:
        print(f"{r['target']}: best generative {energy_phrase(r['best_generative_eV'])}, best RSS "
              f"{energy_phrase(r['best_rss_eV'])}, {speedup_phrase(r['speedup'])}")
    if result.relax_reuse_refused:
        print(result.relax_reuse_refused)
    for warning in result.warnings():
        get_run_logger().warning(warning)
    return result
