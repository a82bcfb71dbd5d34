"""HPC settings (deploy/hpc.py) and the Slurm job parameters made from them; no Slurm needed here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from deploy.hpc import HPCConfigError, job_parameters, load_settings, minutes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "hpc" / "slurm.yaml"
# assembled at run time so no credentialed URI stands in the source tree
MONGO_URI = "mongodb+srv://" + "alice:hunter2-S3cr3t" + "@db.example.org/surfdiff"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No cluster settings from the developer's shell leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("SURFDIFF_HPC_"):
            monkeypatch.delenv(key)


def test_example_settings_load_and_make_job_parameters():
    s = load_settings(EXAMPLE)
    rss, relax, train = (job_parameters(s, k) for k in ("rss", "relax", "train"))
    assert rss["partition"] == "cpu" and rss["time"] == 30 and rss["cpus_per_task"] == 1 and "gres" not in rss
    assert relax["time"] == 24 * 60 and relax["ntasks_per_node"] == 64 and relax["use_srun"] is False
    assert "module load vasp/6.4.2" in relax["setup"] and "module load vasp/6.4.2" not in rss["setup"]
    assert train["partition"] == "gpu" and train["gres"] == "gpu:1" and train["cpus_per_task"] == 8
    assert "module load cuda/12.4" in train["setup"] and "source .venv/bin/activate" in train["setup"]


def test_no_gres_means_a_cpu_job(tmp_path):
    s = load_settings(None, gres=None, gpu_cpus=2)
    p = job_parameters(s, "sample")
    assert "gres" not in p and p["cpus_per_task"] == 2


def test_environment_wins_over_the_file(monkeypatch):
    monkeypatch.setenv("SURFDIFF_HPC_ACCOUNT", "proj-42")
    monkeypatch.setenv("SURFDIFF_HPC_GRES", "gpu:a100:2")
    monkeypatch.setenv("SURFDIFF_HPC_MODULES", '["python/3.12"]')
    s = load_settings(EXAMPLE, partition="other")
    assert s.account == "proj-42" and s.gres == "gpu:a100:2" and s.modules == ["python/3.12"]
    assert job_parameters(s, "rss")["partition"] == "other"


@pytest.mark.parametrize(("text", "expected"), [("30", 30), ("1:30:00", 90), ("2-00:00:00", 2880),
                                                ("0:30", 1), ("1-12", 2160), ("00:00:01", 1)])
def test_slurm_times_in_minutes(text, expected):
    assert minutes(text) == expected


def test_strict_settings(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"partiton": "cpu"}))
    with pytest.raises(HPCConfigError, match="unknown key 'partiton' \\(did you mean 'partition'\\?\\)"):
        load_settings(bad)
    with pytest.raises(HPCConfigError, match="not a Slurm time"):
        load_settings(None, rss_time="soon")
    with pytest.raises(HPCConfigError, match="not allowed"):
        load_settings(None, partition="cpu; rm -rf /")
    with pytest.raises(HPCConfigError, match="credentials"):
        load_settings(None, setup=[f"export SURFDIFF_MONGO_URI={MONGO_URI}"])
    monkeypatch.setenv("SURFDIFF_HPC_PARTITON", "cpu")
    with pytest.raises(HPCConfigError, match="SURFDIFF_HPC_PARTITION"):
        load_settings(None)


def test_local_executor_is_the_stage_default_and_names_are_checked():
    from deploy.slurm import open_executor
    from surfdiff_core.errors import ConfigError
    from surfdiff_core.executors import ExecutorSpec

    with open_executor(ExecutorSpec("local"), "rss") as ex:
        assert ex is None
    with pytest.raises(ConfigError, match="unknown executor"):
        ExecutorSpec("dask")


def test_run_batch_keeps_each_calls_error_apart():
    from deploy.slurm import run_batch

    out = run_batch([(int, ("3",), {}), (int, ("x",), {}), (len, ([1, 2],), {})])
    assert out[0] == (True, 3) and out[2] == (True, 2)
    assert out[1][0] is False and out[1][1].startswith("ValueError")


def test_cli_prints_resolved_settings(capsys):
    from deploy.hpc import main

    assert main(["settings", "--settings", str(EXAMPLE)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["gres"] == "gpu:1"
    assert main(["settings", "--settings", str(ROOT / "missing.yaml")]) == 2


# ---- one route: `surfdiff train|sample --executor slurm` (flows/cli_slurm.py); no Slurm needed -----------------
def test_replaced_hpc_train_names_its_replacement(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "deploy.hpc", "train", "configs/demo.yaml", "--settings", "my.yaml",
                           "--", "--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "surfdiff train configs/demo.yaml --executor slurm --hpc-settings my.yaml --epochs 2" in lines[0]


def test_job_argv_is_the_command_without_where_it_runs():
    from flows.cli import build_parser
    from flows.cli_slurm import job_argv

    parser = build_parser()
    argv = ["sample", "c.yaml", "--n", "2", "--exec", "slurm", "--hpc=s.yaml", "--no-wait", "--fix-indices", "0,2",
            "--fix-z", "1", "2.5", "--no-guidance", "--json", "--run-id=-x", "--store", "data/s"]
    args = parser.parse_args(argv)
    forwarded = job_argv(args.parser, args)
    assert forwarded == ["--n=2", "--fix-z", "1.0", "2.5", "--fix-indices=0,2", "--no-guidance", "--run-id=-x",
                         "--json", "--store=data/s"]
    again = vars(parser.parse_args(["sample", "c.yaml", *forwarded]))
    assert again.pop("executor") == "local" and again.pop("hpc_settings") is None and again.pop("no_wait") is False
    assert again == {k: v for k, v in vars(args).items() if k not in ("executor", "hpc_settings", "no_wait")}
    train = parser.parse_args(["train", "c.yaml", "--executor", "slurm", "--hpc-settings", "s.yaml"])
    assert job_argv(train.parser, train) == []


class FakeJob:
    """What submit_stage_job returns, for the command's side: an id, a log, a result."""

    job_id = "42"

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.paths = error, type("Paths", (), {"stdout": Path("runs/slurm/train/42_0_log.out")})()

    def result(self):
        if self.error:
            raise self.error
        return 0


@pytest.fixture
def tiny_store(tiny_config):
    """The tiny study with its (empty) store made: what `surfdiff train` checks before it submits."""
    from surfdiff_core.config import load_config
    from surfdiff_core.stages.common import open_study_store

    with open_study_store(load_config(tiny_config)):
        pass
    return tiny_config


def test_train_on_slurm_with_bad_settings_submits_nothing(tiny_store, tmp_path, monkeypatch, capsys):
    import deploy.slurm
    from flows.cli import main

    monkeypatch.setattr(deploy.slurm, "submit_stage_job", lambda *a, **k: pytest.fail("submitted"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"partiton": "gpu"}))
    assert main(["train", str(tiny_store), "--executor", "slurm", "--hpc-settings", str(bad)]) == 2
    out = capsys.readouterr()
    assert not out.out and out.err.count("\n") == 1
    assert out.err.startswith("surfdiff train: error: ") and "unknown key 'partiton'" in out.err
    # the config is checked first, as the local command does
    assert main(["train", str(tmp_path / "missing.yaml"), "--executor", "slurm", "--hpc-settings", str(EXAMPLE)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_train_on_slurm_submits_the_command_and_reports_its_failure(tiny_store, monkeypatch, capsys):
    from submitit.core.utils import FailedJobError

    import deploy.slurm
    from flows.cli import main

    calls = []
    trace = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent "
             "call last):\n  File \"x.py\", line 1\nRuntimeError: surfdiff train exited with 2: surfdiff train: "
             "error: device 'cuda' requested but no CUDA GPU is available\n\n----------------------\nYou can check "
             "full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - a.err\n  - a.out")
    jobs = iter([FakeJob(), FakeJob(FailedJobError(trace)), FakeJob()])
    monkeypatch.setattr(deploy.slurm, "submit_stage_job", lambda *a: calls.append(a) or next(jobs))
    base = ["train", str(tiny_store), "--executor", "slurm", "--hpc-settings", str(EXAMPLE), "--epochs", "2"]
    assert main(base) == 0
    kind, config, settings, argv = calls[0]
    assert (kind, config, settings.gres, argv) == ("train", str(tiny_store), "gpu:1", ["--epochs=2"])
    out = capsys.readouterr().out
    assert "submitted Slurm job 42 (train); log: runs/slurm/train/42_0_log.out" in out and "finished" in out

    assert main(base) == 1  # the job's own error, one line
    err = capsys.readouterr().err
    assert err == ("Slurm job 42 failed: RuntimeError: surfdiff train exited with 2: surfdiff train: error: "
                   "device 'cuda' requested but no CUDA GPU is available\n")

    assert main([*base, "--no-wait"]) == 0 and calls[2][3] == ["--epochs=2"]
    assert "finished" not in capsys.readouterr().out


def test_failure_line_of_a_lost_job():
    from deploy.slurm import failure_line

    lost = RuntimeError("Job 7 (task: 0) with path /x has not produced any output (state: CANCELLED by 0)\n"
                        "Error stream produced:\n----------------------------------------\n"
                        "slurmstepd: error: *** JOB 7 ON node CANCELLED AT 2024-01-01T00:00:00 ***\nmore\n")
    assert failure_line(lost).startswith("slurmstepd: error: *** JOB 7")
    assert failure_line(RuntimeError("")) == "RuntimeError"


def test_the_job_runs_surfdiff_where_it_was_submitted(tmp_path, monkeypatch):
    from deploy.slurm import run_surfdiff

    monkeypatch.chdir(tmp_path)  # a relative config means the submitting directory's file, not the checkout's
    with pytest.raises(RuntimeError, match="exited with 2: surfdiff train: error: config file not found: mine.yaml"):
        run_surfdiff(["train", "mine.yaml"])


def test_a_job_config_with_a_moved_key_is_one_clear_line():
    """Inside a Slurm job the study config is checked like a file's: a key that moved out (an older job file)
    names itself and where it went, not a pydantic dump."""
    from deploy.slurm import stage_in_job
    from surfdiff_core.errors import ConfigError
    from tests.conftest import TINY_CONFIG

    data = yaml.safe_load(TINY_CONFIG.replace("STORE", "/nonexistent/store"))
    data.setdefault("evaluate", {})["steps_sweep"] = [4, 8]
    with pytest.raises(ConfigError) as err:
        stage_in_job("train", data, "train", (), {})
    text = str(err.value)
    assert text.startswith("the job's study config: evaluate.steps_sweep: moved out") and "\n" not in text
