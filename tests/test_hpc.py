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
    from deploy.slurm import executor_for

    with executor_for("local", "rss") as ex:
        assert ex is None
    with pytest.raises(HPCConfigError, match="unknown executor"), executor_for("dask", "rss"):
        pass


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
