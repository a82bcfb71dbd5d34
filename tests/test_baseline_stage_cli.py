"""`surfdiff baseline CONFIG` and `baseline_flow`: the evaluation's RSS arm as a stage a user runs on its own. It
writes the arm with the ids the evaluation plans, a rerun adds nothing, a run killed midway is resumed by relaxing
only what is missing, and bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.cli import main
from surfdiff_core.config import load_config
from surfdiff_core.stages.common import open_study_store
from tests.conftest import kill_when
from tests.test_baseline_stage import planned_arm_ids

pytestmark = pytest.mark.slow

P33 = "Ag(fcc111)-p(3x3)-L2"  # the tiny study's target cell, where its arm lives


def arm_rows(cfg) -> dict[str, dict]:
    with open_study_store(cfg) as store:
        return {r["doc_id"]: r for r in store.find_raw({"source": "rss", "system_id": P33},
                                                       properties=["doc_id", "energy", "created_at"])}


def test_the_command_writes_the_arm_and_a_rerun_adds_nothing(tiny_config, capsys):
    cfg = load_config(tiny_config)
    assert main(["baseline", str(tiny_config)]) == 0
    out = capsys.readouterr().out
    rows = arm_rows(cfg)
    assert sorted(rows) == sorted(planned_arm_ids(cfg, cfg.sample.targets[0])) and len(rows) == 3
    best = min(r["energy"] for r in rows.values())
    assert f"Ag2O1 p(3x3): 3 relaxations (3 new, 0 already in the store, 0 failed), 0 lost, best {best:.4f} eV" in out
    with open_study_store(cfg) as store:
        n = store.count({})
    assert n == 3  # the arm only: no training data, no model

    assert main(["baseline", str(tiny_config)]) == 0
    assert "3 relaxations (0 new, 3 already in the store, 0 failed)" in capsys.readouterr().out
    assert arm_rows(cfg) == rows  # the same documents, untouched
    with open_study_store(cfg) as store:
        assert store.count({}) == n


def test_a_killed_run_is_resumed_by_relaxing_only_what_is_missing(tiny_config, tmp_path):
    budget = 40
    cfg = load_config(tiny_config)
    cmd = [sys.executable, "-m", "flows.cli", "baseline", str(tiny_config), "--rss-budget", str(budget)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store_dir = tmp_path / "data" / "store"
    kill_when(cmd, env, lambda: store_dir.exists() and len(arm_rows(cfg)) >= 2, timeout=120, poll=0.05)
    before = {i: r["created_at"] for i, r in arm_rows(cfg).items()}
    assert 2 <= len(before) < budget
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"{budget} relaxations ({budget - len(before)} new, {len(before)} already in the store, 0 failed), "
            f"0 lost") in r.stdout
    after = arm_rows(cfg)
    assert len(after) == budget
    assert {i: row["created_at"] for i, row in after.items() if i in before} == before  # not relaxed again


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "config file not found"),
    (["CONFIG", "--rss-budget", "-1"], "--rss-budget"),
    (["CONFIG", "--rss-budget", "0"], "nothing to do"),
    (["CONFIG", "--cell", "p(3x3)", "--composition", "Xx9"], "unknown element 'Xx'"),
    (["CONFIG", "--executor", "slurm", "--hpc-settings", "MISSING"], "cannot read"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_config, tmp_path, capsys, args, message):
    missing = str(tmp_path / "missing.yaml")
    argv = ["baseline", *[str(tiny_config) if a == "CONFIG" else missing if a == "MISSING" else a for a in args]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surfdiff baseline: error: ") and message in lines[0], lines
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "data" / "store").exists()


def table_artifact(key: str) -> list[dict]:
    import json

    import anyio
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return [a for a in await client.read_artifacts() if a.key == key]

    (artifact, *_) = anyio.run(read)
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_the_flow_returns_the_arm_and_resumes(prefect_harness, tiny_config):
    from flows.baseline import baseline_flow, summary_lines

    cfg = load_config(tiny_config)
    first = baseline_flow(config_path=str(tiny_config))
    (t,) = first.targets
    assert t.doc_ids == planned_arm_ids(cfg, cfg.sample.targets[0]) and (t.done, t.skipped, t.lost) == (3, 0, {})
    rows = arm_rows(cfg)
    best = min(r["energy"] for r in rows.values())
    # the run's log gets one line per target (log_prints; where Prefect's handlers write depends on which flow
    # of the test session configured them first, so the lines are checked from the artifact's rows)
    table = table_artifact("tiny-baseline")
    assert any(r["target"] == "Ag2O1 p(3x3)" and r["relaxations"] == 3 and r["best_energy_eV"] == best
               for r in table)
    assert summary_lines(table) == [f"baseline Ag2O1 p(3x3): 3 relaxations, 0 lost, best {best:.4f} eV"]
    again = baseline_flow(study=cfg)  # the typed study, as the UI's form hands it
    assert again.doc_ids == first.doc_ids and (again.targets[0].done, again.targets[0].skipped) == (0, 3)
    assert again.config_hash == first.config_hash and arm_rows(cfg) == rows


def test_a_lost_job_is_one_warning_line_and_redone_by_a_rerun(tiny_config, capsys, monkeypatch):
    """On an executor, a job that dies is reported by its id (not counted as a stored failure, not stored), and
    the rerun relaxes only it."""
    import contextlib
    import operator
    from concurrent.futures import Executor, Future, ThreadPoolExecutor

    import deploy.slurm

    cfg = load_config(tiny_config)
    victim = planned_arm_ids(cfg, cfg.sample.targets[0])[1]

    class LosesVictim(Executor):
        def __init__(self, inner: Executor) -> None:
            self.inner = inner

        def submit(self, fn, /, *args, **kwargs) -> Future:
            if any(getattr(a, "doc_id", None) == victim for a in args):  # the RSS job of the victim's task
                return self.inner.submit(operator.truediv, 1, 0)
            return self.inner.submit(fn, *args, **kwargs)

    @contextlib.contextmanager
    def slurm_that_loses_a_job(spec, kind):
        assert kind == "rss"
        if not spec.on_slurm:
            yield None
            return
        with ThreadPoolExecutor(1) as pool:
            yield LosesVictim(pool)

    monkeypatch.setattr(deploy.slurm, "open_executor", slurm_that_loses_a_job)
    assert main(["baseline", str(tiny_config), "--executor", "slurm"]) == 0
    out = capsys.readouterr()
    assert "Ag2O1 p(3x3): 2 relaxations (2 new, 0 already in the store, 0 failed), 1 lost" in out.out
    (warning,) = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert f"job {victim} lost on the executor (ZeroDivisionError" in warning
    assert victim not in arm_rows(cfg) and len(arm_rows(cfg)) == 2
    assert main(["baseline", str(tiny_config)]) == 0
    assert "3 relaxations (1 new, 2 already in the store, 0 failed), 0 lost" in capsys.readouterr().out
    assert sorted(arm_rows(cfg)) == sorted(planned_arm_ids(cfg, cfg.sample.targets[0]))
