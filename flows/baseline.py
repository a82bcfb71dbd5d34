"""Baseline flow: the RSS arm of the evaluation in each target cell (no model needed), resumable."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.common import artifact_key, flow_run_id, resolve_study, show_progress
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.executors import ExecutorSpec
from surfdiff_core.stages import baseline
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.results import BaselineResult


@task(retries=1, retry_delay_seconds=10)
def baseline_task(cfg: SurfdiffConfig, run_id: str | None, spec: ExecutorSpec = ExecutorSpec()
                  ) -> tuple[BaselineResult, list[dict]]:
    from deploy.slurm import open_executor

    # the arm is RSS in the target cells: "rss" jobs on Slurm
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        result = baseline.run(cfg, store, run_id=run_id, progress=show_progress(), executor=ex)
        return result, baseline.arm_summary(store, result)


@flow(name="baseline", log_prints=True)
def baseline_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                  store_path: str | None = None, executor: Literal["local", "slurm"] = "local",
                  hpc_settings: str | None = None) -> BaselineResult:
    """The evaluation's RSS arm, evaluate.rss_budget relaxations in each target cell with the study's oracle and
    RSS settings (resumable: a rerun relaxes only what is missing). Pass the result to the evaluation as
    `baseline`. executor="slurm": one Slurm job per structure or batch (settings: the `hpc_settings` file,
    SURFDIFF_HPC_*)."""
    cfg = resolve_study(study, config_path, store_path)
    result, rows = baseline_task(cfg, flow_run_id(), ExecutorSpec(executor, hpc_settings))
    if rows:
        create_table_artifact(key=artifact_key(f"{cfg.name}-baseline"), table=rows,
                              description=f"RSS baseline arm of {result.rss_study}, per target")
    for line in summary_lines(rows):
        print(line)
    return result


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per target of baseline.arm_summary's rows: what the flow logs."""
    out = []
    for r in rows:
        best = "-" if r["best_energy_eV"] is None else f"{r['best_energy_eV']:.4f} eV"
        out.append(f"baseline {r['target']}: {r['relaxations']} relaxations, {r['lost']} lost, best {best}")
    return out
