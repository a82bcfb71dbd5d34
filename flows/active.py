"""Active-learning flow: one task per round (sample, label with the oracle, fine-tune), up to its budget."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.common import artifact_key, flow_run_id, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import active
from surfdiff_core.stages.common import new_run_id, open_study_store
from surfdiff_core.stages.results import TrainResult


@task(retries=1, retry_delay_seconds=10)
def round_task(cfg: SurfdiffConfig, model: TrainResult, k: int, spent: int, run_id: str,
               spec: ExecutorSpec = ExecutorSpec()) -> tuple[TrainResult, dict]:
    from deploy.slurm import open_executor

    # the labels are RSS-like relaxations and single points (in-process oracle, rss settings): "rss" jobs
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        return active.run_round(cfg, store, model, k, spent=spent, run_id=run_id, progress=show_progress(),
                                executor=ex)


@flow(name="active-learning", log_prints=True)
def active_learning_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                         upstream: TrainResult | None = None, store_path: str | None = None,
                         rounds: int | None = None, executor: Literal["local", "slurm"] = "local",
                         hpc_settings: str | None = None) -> active.ActiveLearningResult:
    """Rounds of sampling, oracle labels for the best distinct samples, and fine-tuning (resumable).
    executor="slurm": each oracle label as a Slurm job (settings: the `hpc_settings` file, SURFDIFF_HPC_*); a
    lost job is reported, not stored, and a rerun redoes it."""
    cfg = resolve_study(study, config_path, store_path)
    spec = ExecutorSpec(executor, hpc_settings)
    if rounds is not None:
        cfg = cfg.model_copy(update={"active_learning": cfg.active_learning.model_copy(update={"rounds": rounds})})
    run_id = flow_run_id() or new_run_id()
    if upstream is None:
        from surfdiff_core.stages.sample import registered_model

        upstream = registered_model(cfg, run_id)
    result = active.ActiveLearningResult(study=cfg.name, run_id=run_id,
                                         config_hash=cfg.section_hash("active_learning"), model=upstream)
    for k in range(1, cfg.active_learning.rounds + 1):
        if not active.budget_left(cfg, result.relaxations):
            print(f"active learning: budget of {cfg.active_learning.max_relaxations} relaxations reached")
            break
        result.model, record = round_task(cfg, result.model, k, result.relaxations, run_id, spec)
        active.add_round(result, record)
        print(f"round {k}: {record['labels']} relaxed labels, {record['single_points']} single points, "
              f"model {record['model_id']}, best {record['best_labelled']}")
        for doc_id, why in sorted(record["lost"].items()):
            get_run_logger().warning(f"round {k}: label {doc_id} lost on the executor ({why}); rerun to redo it")
    if result.rounds:
        create_table_artifact(key=artifact_key(f"{cfg.name}-active-learning"),
                              table=[{k: v for k, v in r.items() if k not in ("best_labelled", "lost")} | {
                                  "best_labelled": str(r["best_labelled"]), "lost": len(r["lost"])}
                                  for r in result.rounds],
                              description="Active-learning rounds")
    return result
