"""The discovery pipeline (the paper's figure): RSS data -> train denoiser + MLFF -> guided sampling across
compositions and cells -> relax the best candidates -> evaluate against RSS -> everything in the store.
Each stage's result is handed to the next explicitly."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task

from flows.active import active_learning_flow
from flows.common import resolve_study
from flows.evaluate import evaluate_flow
from flows.relax import relax_flow
from flows.rss import rss_flow
from flows.sample import sample_flow
from flows.train import train_flow
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.evaluate_report import EvaluationResult
from surfdiff_core.stages.outputs import write_run_outputs


@flow(name="discovery", log_prints=True)
def discovery_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                   store_path: str | None = None, evaluate: bool = True,
                   executor: Literal["local", "slurm"] = "local", hpc_settings: str | None = None) -> dict:
    """Whole pipeline on one study. Rerunning after an interruption reuses every finished stage.
    executor="slurm": RSS, active-learning labels and relaxations as Slurm jobs, training and sampling as GPU
    jobs (settings: the `hpc_settings` file, SURFDIFF_HPC_*)."""
    cfg = resolve_study(study, config_path, store_path)  # parsed once, before any work
    rss = rss_flow(study=cfg, executor=executor, hpc_settings=hpc_settings)
    model = train_flow(study=cfg, upstream=rss, executor=executor, hpc_settings=hpc_settings)
    learning = None
    if cfg.active_learning.rounds:
        learning = active_learning_flow(study=cfg, upstream=model, executor=executor, hpc_settings=hpc_settings)
        model = learning.model
    samples = sample_flow(study=cfg, upstream=model, executor=executor, hpc_settings=hpc_settings)
    relaxed = relax_flow(study=cfg, upstream=samples, executor=executor, hpc_settings=hpc_settings)
    evaluation = (evaluate_flow(study=cfg, upstream=samples, executor=executor, hpc_settings=hpc_settings,
                                relaxed=relaxed) if evaluate else None)
    outputs = outputs_task(cfg, evaluation)
    return {"study": cfg.name, "rss": rss.as_dict(ids=False), "model": model.as_dict(ids=False),
            "samples": samples.as_dict(ids=False), "relax": relaxed.as_dict(ids=False),
            "active_learning": learning.rounds if learning else None,
            "evaluation": evaluation.rows() if evaluation else None,
            "evaluation_all_in": evaluation.all_in if evaluation else None,
            "relax_reuse": ({"reused": evaluation.relax_reused, "refused": evaluation.relax_reuse_refused}
                            if evaluation else None),
            "phase_diagram": evaluation.phase_diagram if evaluation else [],
            "warnings": evaluation.warnings() if evaluation else [], "outputs": outputs}


@task
def outputs_task(cfg: SurfdiffConfig, evaluation: EvaluationResult | None) -> dict:
    """The report, figures and best structures where people look for them (paths in the flow's result)."""
    with open_study_store(cfg) as store:
        return write_run_outputs(cfg, store, evaluation)
