"""HPC route: Slurm scripts rendered from HPCSettings, no secrets in them, strict settings, example files."""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deploy.hpc import (
    HPCConfigError,
    HPCSettings,
    jobflow_remote_project,
    load_settings,
    main,
    render_sbatch,
    scrub,
    slurm_cluster_kwargs,
    submit,
    write_private_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
HPC = ROOT / "deploy" / "hpc"
SLURM_YAML = HPC / "slurm.yaml"
# assembled at run time so no credentialed URI stands in the source tree
MONGO_URI = "mongodb+srv://" + "alice:hunter2-S3cr3t" + "@db.example.org/surfdiff?retryWrites=true"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No cluster settings or secrets from the developer's shell leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("SURFDIFF_HPC_") or key in ("VASP_CMD", "SURFDIFF_MONGO_URI", "PREFECT_API_KEY"):
            monkeypatch.delenv(key)


def directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_gpu_train_and_sample_directives(monkeypatch):
    monkeypatch.setenv("SURFDIFF_HPC_ACCOUNT", "proj-42")
    s = load_settings(SLURM_YAML, gpu_type="a100", gpus=2)
    train = render_sbatch("train", s, config="configs/demo.yaml", args=["--epochs", "5"])
    d = directives(train)
    assert d["gres"] == "gpu:a100:2"
    assert d["partition"] == "gpu"
    assert d["time"] == "12:00:00"
    assert d["account"] == "proj-42"
    assert d["ntasks"] == "1" and d["cpus-per-task"] == "8" and d["mem"] == "32G"
    assert d["export"] == "ALL"
    assert d["output"] == "/path/to/surfdiff/runs/slurm/%x-%j.out"
    assert "module load python/3.11\nmodule load cuda/12.4\n" in train
    assert "source .venv/bin/activate" in train
    assert "srun surfdiff train configs/demo.yaml --device cuda --epochs 5" in train

    sample = directives(render_sbatch("sample", s, config="configs/demo.yaml"))
    assert sample["time"] == "04:00:00" and sample["gres"] == "gpu:a100:2"


def test_environment_overrides_file(monkeypatch):
    monkeypatch.setenv("SURFDIFF_HPC_GPU_PARTITION", "a100q")
    monkeypatch.setenv("SURFDIFF_HPC_TRAIN_TIME", "2-00:00:00")
    monkeypatch.setenv("SURFDIFF_HPC_MODULES", '["python/3.12"]')
    s = load_settings(SLURM_YAML)
    d = directives(render_sbatch("train", s, config="c.yaml"))
    assert d["partition"] == "a100q" and d["time"] == "2-00:00:00"
    assert "account" not in d  # not set anywhere: no directive rather than an empty one
    assert s.modules == ["python/3.12"]


def test_dft_script_uses_vasp_cmd_from_env(monkeypatch):
    monkeypatch.setenv("VASP_CMD", "mpirun -np 128 vasp_std")
    s = load_settings(SLURM_YAML, dft_nodes=2)
    text = render_sbatch("dft", s, config="configs/cu100-o.yaml")
    d = directives(text)
    assert d["partition"] == "cpu" and d["nodes"] == "2" and d["ntasks-per-node"] == "64"
    assert d["time"] == "24:00:00"
    assert "gres" not in d
    assert "export VASP_CMD='mpirun -np 128 vasp_std'" in text
    assert 'export ATOMATE2_VASP_CMD="$VASP_CMD"' in text
    assert "module load vasp/6.4.2" in text
    # one driver process (custodian starts VASP with srun/mpirun itself)
    assert "\nsurfdiff relax configs/cu100-o.yaml --method vasp" in text


def test_scripts_are_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    s = load_settings(SLURM_YAML, venv=None, modules=[], workdir="/tmp/some dir/with 'quotes'")
    for kind in ("train", "sample", "dft", "worker"):
        text = render_sbatch(kind, s, config="configs/demo.yaml", store="data/my store")
        r = subprocess.run([bash, "-n"], input=text, text=True, capture_output=True)
        assert r.returncode == 0, (kind, r.stderr)
    assert "cd '/tmp/some dir/with '\"'\"'quotes'\"'\"''" in text


def test_no_secrets_in_rendered_text(monkeypatch):
    monkeypatch.setenv("SURFDIFF_MONGO_URI", MONGO_URI)
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_topsecretkey")
    monkeypatch.setenv("SURFDIFF_HPC_ACCOUNT", "proj-42")
    s = load_settings(SLURM_YAML)
    texts = [render_sbatch(k, s, config="configs/demo.yaml") for k in ("train", "sample", "dft", "worker")]
    texts += [repr(s), s.model_dump_json(), repr(slurm_cluster_kwargs(s))]
    for text in texts:
        assert "hunter2" not in text and MONGO_URI not in text and "pnu_topsecretkey" not in text
    assert "SURFDIFF_MONGO_URI" in texts[0]  # the script names the variable, never its value
    # job logs shown in the Prefect UI are scrubbed
    other = "mongodb://" + "u:pw" + "@h/x"
    log = f"connecting to {MONGO_URI} with key pnu_topsecretkey; other {other}"
    clean = scrub(log)
    assert "hunter2" not in clean and "pnu_topsecretkey" not in clean and ":pw@" not in clean
    assert "<SURFDIFF_MONGO_URI>" in clean


def test_settings_reject_unknown_keys(tmp_path, monkeypatch):
    bad = tmp_path / "slurm.yaml"
    bad.write_text("gpu_partiton: gpu\n")
    with pytest.raises(HPCConfigError, match=r"unknown key 'gpu_partiton' \(did you mean 'gpu_partition'\?\)"):
        load_settings(bad)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        HPCSettings(bogus=1)
    monkeypatch.setenv("SURFDIFF_HPC_GPU_PARTITON", "gpu")
    with pytest.raises(HPCConfigError, match="unknown environment variable SURFDIFF_HPC_GPU_PARTITON"):
        load_settings(SLURM_YAML)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train_time", "12h", "not a Slurm time"),
    ("gpu_partition", "gpu; rm -rf ~", "not allowed"),
    ("modules", ["cuda/12.4 && curl x"], "not allowed"),
    ("extra_directives", ["--mail-type=FAIL\nrm -rf ~"], "must be one"),
    ("workdir", "/scratch\nrm -rf ~", "single line"),
    ("extra_directives", ["--comment=mongodb://" + "bob:pw" + "@db/x"], "credentials"),
])
def test_settings_reject_bad_values(key, value, message):
    with pytest.raises(HPCConfigError, match=message):
        load_settings(SLURM_YAML, **{key: value})


def test_render_command_line(capsys, monkeypatch):
    rc = main(["render", "sample", "configs/demo.yaml", "--settings", str(SLURM_YAML), "--", "--n", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash\n")
    assert "srun surfdiff sample configs/demo.yaml --device cuda --n 64" in out
    monkeypatch.setenv("SURFDIFF_HPC_NOPE", "1")
    assert main(["render", "train", "c.yaml"]) == 2
    assert "unknown environment variable SURFDIFF_HPC_NOPE" in capsys.readouterr().err


FAKE_SBATCH = r"""#!/bin/bash
# Fake sbatch: runs the script at once with bash, as Slurm would, writing the --output file.
script="${@: -1}"
id=4242
echo "$id;testcluster"
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed "s/%x/$name/; s/%j/$id/")
SLURM_JOB_ID=$id bash "$script" > "$out" 2>&1
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("rc", [0, 3])
def test_submit_with_fake_slurm(tmp_path, monkeypatch, rc):
    """The rendered script really runs (fake sbatch/srun/surfdiff); a failing job gives its exit code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", FAKE_SBATCH)
    _executable(bin_dir / "srun", '#!/bin/bash\nexec "$@"\n')
    _executable(bin_dir / "surfdiff", f'#!/bin/bash\necho "fake surfdiff $*"\nexit {rc}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SURFDIFF_MONGO_URI", MONGO_URI)
    s = load_settings(SLURM_YAML, workdir=str(tmp_path), venv=None, modules=[], gpu_modules=[])
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch("train", s, config="configs/demo.yaml"))
    seen = []
    result = submit(script, log_dir=tmp_path / "runs" / "slurm", on_submit=seen.append)
    assert seen == ["4242"] and result.job_id == "4242"
    assert result.returncode == rc and result.ok is (rc == 0)
    log = Path(result.log).read_text()
    assert result.log.endswith("runs/slurm/surfdiff-train-4242.out")
    assert "fake surfdiff train configs/demo.yaml --device cuda" in log
    assert "surfdiff train: job 4242" in log
    assert "hunter2" not in log


@pytest.mark.slow
def test_slurm_flow_with_fake_slurm(prefect_harness, tmp_path, monkeypatch):
    """The deployed flow end to end: render, submit, wait, artifact with the (scrubbed) job log, failure."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from deploy.hpc import slurm_flow

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", FAKE_SBATCH)
    _executable(bin_dir / "srun", '#!/bin/bash\nexec "$@"\n')
    _executable(bin_dir / "surfdiff", '#!/bin/bash\necho "fake surfdiff $* $SURFDIFF_MONGO_URI"\n'
                                      'exit ${FAKE_RC:-0}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SURFDIFF_MONGO_URI", MONGO_URI)
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"workdir": str(tmp_path), "venv": None, "modules": [], "gpu_modules": []}))

    out = slurm_flow(kind="sample", config_path="configs/demo.yaml", settings_path=str(settings), args=["--n", "8"])
    assert out["job_id"] == "4242" and out["returncode"] == 0
    assert Path(out["script"]).parent == tmp_path / "runs" / "slurm" / "scripts"
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["slurm-sample"])))
    text = arts[0].data
    assert "fake surfdiff sample configs/demo.yaml --device cuda --n 8" in text
    assert "hunter2" not in text and "<SURFDIFF_MONGO_URI>" in text  # the job printed it; the artifact masks it

    monkeypatch.setenv("FAKE_RC", "3")
    with pytest.raises(RuntimeError, match="Slurm job 4242 failed with exit code 3"):
        slurm_flow(kind="train", config_path="configs/demo.yaml", settings_path=str(settings))


def test_submit_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HPCConfigError, match="not found"):
        submit(tmp_path / "x.sbatch", log_dir=tmp_path, sbatch="sbatch")


# ---- example files ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*URIStore is deprecated:FutureWarning")
def test_jobflow_remote_example(tmp_path, monkeypatch):
    template = HPC / "jobflow-remote.yaml"
    raw = template.read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", raw) and "password" not in raw.lower()  # no credentials
    yaml.safe_load(raw)  # parses as it is (placeholders are plain strings)
    monkeypatch.setenv("SURFDIFF_HPC_ACCOUNT", "proj-42")
    project = jobflow_remote_project(template, environ={"SURFDIFF_MONGO_URI": MONGO_URI},
                                     settings=load_settings(SLURM_YAML))
    worker = project["workers"]["slurm-cpu"]
    assert worker["type"] == "local" and worker["scheduler_type"] == "slurm"
    assert worker["resources"]["partition"] == "cpu" and worker["resources"]["account"] == "proj-42"
    assert worker["resources"]["time"] == "24:00:00"
    assert project["exec_config"]["vasp"]["modules"] == ["vasp/6.4.2"]
    assert project["queue"]["store"]["uri"] == MONGO_URI
    with pytest.raises(HPCConfigError, match="SURFDIFF_MONGO_URI is not set"):
        jobflow_remote_project(template, environ={}, settings=load_settings(SLURM_YAML))

    from jobflow import JobStore

    store = JobStore.from_dict_spec(project["jobstore"])  # the store types exist (no connection is made)
    assert type(store.docs_store).__name__ == "MongoURIStore"
    try:
        from jobflow_remote.config.base import Project
    except ImportError:
        pass
    else:
        Project.model_validate(project)

    out = write_private_yaml(project, tmp_path / "jfremote" / "surfdiff.yaml")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert yaml.safe_load(out.read_text())["name"] == "surfdiff"


def test_dask_jobqueue_example(monkeypatch):
    cfg = yaml.safe_load((HPC / "dask-jobqueue.yaml").read_text())
    slurm = cfg["jobqueue"]["slurm"]
    assert "--gres=gpu:1" in slurm["job-extra-directives"]
    assert slurm["processes"] == 1 and slurm["queue"] == "gpu"
    monkeypatch.setenv("SURFDIFF_HPC_ACCOUNT", "proj-42")
    kw = slurm_cluster_kwargs(load_settings(SLURM_YAML, gpu_type="h100"))
    assert kw["queue"] == "gpu" and kw["account"] == "proj-42" and kw["walltime"] == "04:00:00"
    assert "--gres=gpu:h100:1" in kw["job_extra_directives"]
    assert any(line.startswith("module load") for line in kw["job_script_prologue"])


def test_worker_sbatch_example():
    text = (HPC / "worker.sbatch").read_text()
    lines = [x for x in text.splitlines() if x.strip()]
    first_command = next(i for i, x in enumerate(lines) if not x.startswith("#"))
    assert all(i < first_command for i, x in enumerate(lines) if x.startswith("#SBATCH"))  # sbatch stops there
    assert "--pool surfdiff-slurm --type process" in text
    if bash := shutil.which("bash"):
        assert subprocess.run([bash, "-n", str(HPC / "worker.sbatch")]).returncode == 0
    rendered = render_sbatch("worker", load_settings(SLURM_YAML))
    assert "PREFECT_API_URL:?" in rendered and "exec prefect worker start --pool surfdiff-slurm" in rendered


def test_slurm_settings_example_is_complete():
    raw = yaml.safe_load(SLURM_YAML.read_text())
    assert set(raw) <= set(HPCSettings.model_fields)
    assert "account" not in raw  # comes from the environment
    load_settings(SLURM_YAML)


def _flow_params(entrypoint: str) -> set[str]:
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


@pytest.mark.parametrize("prefect_file", ["deploy/prefect.yaml", "deploy/hpc/prefect.yaml"])
def test_prefect_yaml_files(prefect_file):
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((ROOT / prefect_file).read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert model.deployments
    for dep in model.deployments:
        assert dep.work_pool and dep.work_pool.name
        params = _flow_params(dep.entrypoint)  # entrypoint exists, parameters match its signature
        assert set(dep.parameters) <= params, (dep.entrypoint, set(dep.parameters) - params)
        cfg = dep.parameters.get("config_path")
        assert cfg is None or (ROOT / cfg).is_file()
    pulls = raw["pull"]
    assert list(pulls[0]) == ["prefect.deployments.steps.set_working_directory"]
