"""Training flow: denoiser + MLFF on the study's RSS data (GPU when present), resumable by model id."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, flow_run_id, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.report import loss_curves, png_markdown
from surfdiff_core.stages import train
from surfdiff_core.stages.common import figure_dir, open_study_store
from surfdiff_core.stages.results import RSSResult, TrainResult


@task(retries=1, retry_delay_seconds=5)
def train_task(cfg: SurfdiffConfig, upstream: RSSResult | None, epochs: int | None, run_id: str | None,
               spec: ExecutorSpec) -> TrainResult:
    if spec.on_slurm:  # one GPU job (the settings' GRES) on the cluster
        from deploy.slurm import run_stage_as_job

        return run_stage_as_job("train", spec, cfg, "train", upstream, epochs=epochs, run_id=run_id)
    with open_study_store(cfg) as store:
        return train.run(cfg, store, upstream, epochs=epochs, run_id=run_id, progress=show_progress())


@flow(name="train", log_prints=True)
def train_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
               upstream: RSSResult | None = None, epochs: int | None = None, store_path: str | None = None,
               executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None) -> TrainResult:
    """Train the PaiNN denoiser and MLFF (one shared representation) on the study's RSS data.
    executor="slurm": as one Slurm GPU job (settings: the `hpc_settings` file, SURFDIFF_HPC_*)."""
    cfg = resolve_study(study, config_path, store_path)
    res = train_task(cfg, upstream, epochs, flow_run_id(), ExecutorSpec(executor, hpc_settings))
    if res.history:
        png = loss_curves(res.history, figure_dir(cfg) / f"{res.model_id}-loss.png")
        create_markdown_artifact(
            key=artifact_key(f"{cfg.name}-training"),
            markdown=f"# Training {res.model_id}\n\nstudy {cfg.name}, system {res.system_id}, energy model "
                     f"{', '.join(res.energy_models)}; epochs {res.epochs}, best validation loss "
                     f"{res.best_val:.4f}, {res.n_train} train / {res.n_val} validation structures\n\n"
                     f"{png_markdown(png, 'losses')}\n",
        )
    print(f"model {res.model_id} -> {res.checkpoint}")
    if res.warning:
        get_run_logger().warning(res.warning)
    return res
