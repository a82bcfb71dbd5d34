"""HPC route: Slurm job scripts for GPU training/sampling and CPU DFT (VASP), rendered from typed settings.

The settings (`HPCSettings`) come from deploy/hpc/slurm.yaml (no secrets: partitions, times, modules)
overridden by SURFDIFF_HPC_* environment variables (the account usually comes from SURFDIFF_HPC_ACCOUNT,
the VASP command from VASP_CMD). Credentials are never fields: the Mongo URI, Prefect API key and friends
stay in the environment of the worker and reach the job through `sbatch --export=ALL`; the rendered
scripts only name them.

Nothing here imports surfdiff_core (no torch & co. on the login node just to write a script); the Prefect
flow `slurm_flow` (deployed by deploy/hpc/prefect.yaml on the login-node worker) submits a rendered script
with `sbatch --wait` and fails when the job fails. `python -m deploy.hpc render KIND CONFIG` prints a script.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "SURFDIFF_HPC_"
Kind = Literal["train", "sample", "dft", "worker"]
KINDS: tuple[str, ...] = ("train", "sample", "dft", "worker")
# Environment variables a job may need whose *values* must never appear in a script, a log or a file.
SECRET_ENV = ("SURFDIFF_MONGO_URI", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")

_TOKEN = re.compile(r"^[A-Za-z0-9_.,:+=/@%-]+$")  # partition, account, qos, gres, memory: no shell syntax
_MODULE = re.compile(r"^[A-Za-z0-9_.+/@-]+$")
_TIME = re.compile(r"^\d+(-\d{1,2}(:\d{2}){0,2}|(:\d{2}){0,2})$")  # every form sbatch --time accepts
_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s]+@", re.I)  # scheme://user:password@


class HPCConfigError(ValueError):
    """Invalid HPC settings (unknown key, bad value, a secret where none belongs): one line for the user."""


class HPCSettings(BaseSettings):
    """Cluster settings for rendering sbatch scripts. Every field can be set as SURFDIFF_HPC_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True,
                                      validate_default=True)

    cluster: str = "cluster"
    workdir: str = "."  # the surfdiff checkout on the cluster (jobs cd there; relative config paths start there)
    venv: str | None = ".venv"  # virtual environment to activate (relative to workdir), None = none
    modules: list[str] = Field(default_factory=list)  # `module load` for every job, e.g. python/3.11
    account: str | None = None  # normally from SURFDIFF_HPC_ACCOUNT, so the file stays shareable
    qos: str | None = None
    log_dir: str = "runs/slurm"  # relative to workdir; %x-%j.out per job
    extra_directives: list[str] = Field(default_factory=list)  # e.g. ["--constraint=a100", "--mail-type=FAIL"]

    # GPU jobs: training and sampling
    gpu_partition: str = "gpu"
    gpus: int = Field(1, ge=1)
    gpu_type: str | None = None  # gres type, e.g. a100 -> --gres=gpu:a100:1
    gpu_cpus: int = Field(8, ge=1)
    gpu_mem: str | None = "32G"
    gpu_modules: list[str] = Field(default_factory=list)  # e.g. cuda/12.4
    train_time: str = "12:00:00"
    sample_time: str = "04:00:00"

    # CPU jobs: DFT relaxations (VASP through atomate2 + custodian)
    cpu_partition: str = "cpu"
    dft_nodes: int = Field(1, ge=1)
    dft_ntasks_per_node: int = Field(64, ge=1)
    dft_cpus_per_task: int = Field(1, ge=1)
    dft_mem: str | None = None
    dft_time: str = "24:00:00"
    dft_modules: list[str] = Field(default_factory=list)  # e.g. vasp/6.4.2
    vasp_cmd: str = Field("srun vasp_std", validation_alias=AliasChoices(
        "vasp_cmd", f"{ENV_PREFIX}VASP_CMD", "VASP_CMD"))

    # The Prefect worker as a long-running job (where login nodes forbid long processes)
    worker_partition: str | None = None  # None = cpu_partition
    worker_time: str = "7-00:00:00"
    worker_pool: str = "surfdiff-slurm"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the (shared) YAML file; no .env or secrets-dir files are read.
        return env_settings, init_settings

    @field_validator("cluster", "gpu_partition", "cpu_partition", "worker_partition", "account", "qos",
                     "gpu_type", "gpu_mem", "dft_mem", "worker_pool")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN.match(v):
            raise ValueError(f"{v!r} contains characters not allowed in a Slurm value")
        return v

    @field_validator("train_time", "sample_time", "dft_time", "worker_time")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _TIME.match(v):
            raise ValueError(f"{v!r} is not a Slurm time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
        return v

    @field_validator("modules", "gpu_modules", "dft_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for m in v:
            if not _MODULE.match(m):
                raise ValueError(f"module name {m!r} contains characters not allowed")
        return v

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d.startswith("--") or "\n" in d:
                raise ValueError(f"sbatch directive {d!r} must be one '--option[=value]'")
        return v

    @field_validator("workdir", "venv", "log_dir", "vasp_cmd")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and ("\n" in v or "\r" in v):
            raise ValueError("must be a single line")
        return v

    @model_validator(mode="after")
    def _no_credentials(self) -> HPCSettings:
        for name, value in self:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and _CREDENTIALS.search(item):
                    raise ValueError(f"{name} holds a URI with credentials: keep secrets in environment "
                                     f"variables (e.g. SURFDIFF_MONGO_URI), never in the settings")
        return self


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    fields = {f.upper() for f in HPCSettings.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX)
                  and k.upper()[len(ENV_PREFIX):] not in fields)


def _one_line_error(exc: ValidationError, where: str) -> HPCConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "settings"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, HPCSettings.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return HPCConfigError(f"{where}: unknown key {key!r}{hint}")
    return HPCConfigError(f"{where}: {key}: {err['msg']}")


def load_settings(path: str | Path | None = None, **overrides: Any) -> HPCSettings:
    """Settings from a YAML file (flat keys, see deploy/hpc/slurm.yaml), then SURFDIFF_HPC_* variables
    (which win), with `overrides` above the file. Unknown keys and variables fail with one line."""
    if bad := _unknown_env(os.environ):
        close = difflib.get_close_matches(bad[0][len(ENV_PREFIX):].lower(), HPCSettings.model_fields, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
        raise HPCConfigError(f"unknown environment variable {bad[0]}{hint}")
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise HPCConfigError(f"{path}: cannot read: {exc}") from None
        if not isinstance(loaded, dict | None):
            raise HPCConfigError(f"{path}: expected a mapping of settings")
        data = loaded or {}
    data.update(overrides)
    try:
        return HPCSettings(**data)
    except ValidationError as exc:
        raise _one_line_error(exc, str(path) if path else "HPC settings") from None


# ---- rendering --------------------------------------------------------------------------------------------
_SCRIPT = string.Template("""\
#!/bin/bash
${directives}
# surfdiff ${kind} job, rendered by deploy/hpc.py for cluster '${cluster}'.
# Secrets (SURFDIFF_MONGO_URI, PREFECT_API_KEY, ...) are inherited from the submitting environment
# (--export=ALL) and never written into this file.
set -euo pipefail
${modules}
cd ${workdir}
${venv}
export OMP_NUM_THREADS="$${SLURM_CPUS_PER_TASK:-1}"
export PYTHONUNBUFFERED=1
${checks}
echo "surfdiff ${kind}: job $${SLURM_JOB_ID:-local} on $$(hostname) at $$(date -Is)"
${body}
""")


def _q(v: str | Path) -> str:
    return shlex.quote(str(v))


def _log_path(s: HPCSettings) -> Path:
    return Path(s.log_dir) if Path(s.log_dir).is_absolute() else Path(s.workdir) / s.log_dir


def _command(kind: str, config: str | None, store: str | None, args: Sequence[str]) -> list[str]:
    if kind == "worker":
        return []
    if not config:
        raise HPCConfigError(f"a {kind} job needs a config path")
    cmd = ["surfdiff", "relax" if kind == "dft" else kind, config]
    if kind in ("train", "sample"):
        cmd += ["--device", "cuda"]
    if kind == "dft":
        cmd += ["--method", "vasp"]
    if store:
        cmd += ["--store", store]
    return cmd + list(args)


def render_sbatch(kind: Kind, settings: HPCSettings, *, config: str | None = None, store: str | None = None,
                  args: Sequence[str] = (), job_name: str | None = None) -> str:
    """The sbatch script of one job: `train`/`sample` on a GPU, `dft` (VASP relaxations) on CPU nodes,
    `worker` = the Prefect worker of the Slurm pool as a long job. `args` go to the surfdiff command."""
    if kind not in KINDS:
        raise HPCConfigError(f"unknown job kind {kind!r}; valid: {', '.join(KINDS)}")
    s = settings
    name = job_name or f"surfdiff-{kind}"
    if not _TOKEN.match(name):
        raise HPCConfigError(f"job name {name!r} contains characters not allowed")
    d: dict[str, str | int | None] = {"job-name": name}
    modules = list(s.modules)
    if kind in ("train", "sample"):
        gres = f"gpu:{s.gpu_type}:{s.gpus}" if s.gpu_type else f"gpu:{s.gpus}"
        d.update({"partition": s.gpu_partition, "time": s.train_time if kind == "train" else s.sample_time,
                  "nodes": 1, "ntasks": 1, "cpus-per-task": s.gpu_cpus, "gres": gres, "mem": s.gpu_mem})
        modules += s.gpu_modules
    elif kind == "dft":
        d.update({"partition": s.cpu_partition, "time": s.dft_time, "nodes": s.dft_nodes,
                  "ntasks-per-node": s.dft_ntasks_per_node, "cpus-per-task": s.dft_cpus_per_task,
                  "mem": s.dft_mem})
        modules += s.dft_modules
    else:
        d.update({"partition": s.worker_partition or s.cpu_partition, "time": s.worker_time, "nodes": 1,
                  "ntasks": 1, "cpus-per-task": 2, "mem": "4G"})
    d.update({"account": s.account, "qos": s.qos, "chdir": s.workdir,
              "output": str(_log_path(s) / "%x-%j.out"), "export": "ALL"})
    directives = [f"#SBATCH --{k}={_q(v) if k in ('chdir', 'output') else v}" for k, v in d.items()
                  if v is not None]
    directives += [f"#SBATCH {x}" for x in s.extra_directives]

    checks = ['if [ -z "${SURFDIFF_MONGO_URI:-}" ]; then echo "note: SURFDIFF_MONGO_URI is not set: '
              'a config with store.backend: mongo will fail" >&2; fi']
    cmd = _command(kind, config, store, args)
    if kind in ("train", "sample"):
        body = "nvidia-smi --query-gpu=name,memory.total --format=csv || true\nsrun " + shlex.join(cmd)
    elif kind == "dft":
        # atomate2 reads ATOMATE2_VASP_CMD, custodian runs it; one surfdiff process drives all VASP runs.
        body = (f"export VASP_CMD={_q(s.vasp_cmd)}\nexport ATOMATE2_VASP_CMD=\"$VASP_CMD\"\n"
                + shlex.join(cmd))
        checks.append('if [ -z "${PMG_VASP_PSP_DIR:-}" ] && [ ! -f ~/.config/.pmgrc.yaml ] && '
                      '[ ! -f ~/.pmgrc.yaml ]; then echo "note: PMG_VASP_PSP_DIR (POTCARs) is not set" >&2; fi')
    else:
        checks = [': "${PREFECT_API_URL:?export PREFECT_API_URL (the Prefect server) before sbatch}"']
        body = ("export SURFDIFF_HPC_WORKDIR=\"$PWD\"  # the pull step of deploy/hpc/prefect.yaml\n"
                f"exec prefect worker start --pool {_q(s.worker_pool)} --type process")
    return _SCRIPT.substitute(
        directives="\n".join(directives), kind=kind, cluster=s.cluster,
        modules="\n".join(f"module load {m}" for m in modules) if modules else "# (no modules)",
        workdir=_q(s.workdir), venv=f"source {_q(Path(s.venv) / 'bin' / 'activate')}" if s.venv else "# (no venv)",
        checks="\n".join(checks), body=body,
    )


def write_script(text: str, directory: str | Path, name: str) -> Path:
    """Write a rendered script, executable, creating its directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text(text)
    path.chmod(0o750)
    return path


# ---- submission -------------------------------------------------------------------------------------------
@dataclass
class SlurmResult:
    job_id: str
    returncode: int
    script: str
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def submit(script: str | Path, *, log_dir: str | Path, wait: bool = True, sbatch: str = "sbatch",
           on_submit: Callable[[str], None] | None = None) -> SlurmResult:
    """`sbatch --parsable [--wait] SCRIPT`; cancels the job (scancel) if we are interrupted while waiting."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise HPCConfigError(f"{sbatch!r} not found: run the Slurm worker on the cluster's login node")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--parsable", *(["--wait"] if wait else []), str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = ""
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        job_id = first.split(";")[0]  # "<id>[;cluster]"
        if job_id and on_submit:
            on_submit(job_id)
        _, err = proc.communicate()
    except BaseException:
        if job_id:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([shutil.which("scancel") or "scancel", job_id], timeout=30, check=False)
        proc.kill()
        raise
    if not job_id:
        raise HPCConfigError(f"sbatch gave no job id (exit {proc.returncode}): {err.strip()[:500]}")
    name = _job_name(Path(script))
    return SlurmResult(job_id=job_id, returncode=proc.returncode, script=str(script),
                       log=str(Path(log_dir) / f"{name}-{job_id}.out"))


def _job_name(script: Path) -> str:
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --job-name="):
            return line.split("=", 1)[1].strip()
    return script.stem


def _tail(path: str | Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with the values of the secret variables masked (for job logs shown in the Prefect UI)."""
    env = os.environ if environ is None else environ
    for key in SECRET_ENV:
        if val := env.get(key):
            text = text.replace(val, f"<{key}>")
    return _CREDENTIALS.sub(lambda m: m.group(0).split("//")[0] + "//***:***@", text)


# ---- jobflow-remote ---------------------------------------------------------------------------------------
def jobflow_remote_project(template: str | Path, environ: Mapping[str, str] | None = None,
                           settings: HPCSettings | None = None) -> dict[str, Any]:
    """deploy/hpc/jobflow-remote.yaml with ${VAR} placeholders filled from the environment (the Mongo URI)
    and ${hpc.FIELD} from the HPC settings. Returns the project dict; write it with `write_private_yaml`."""
    env = dict(os.environ if environ is None else environ)
    s = settings or load_settings()
    # Lists as JSON flow sequences (valid YAML); None as an empty value (YAML null).
    values = {**env, **{f"hpc_{k}": json.dumps(v) if isinstance(v, list) else "" if v is None else str(v)
                        for k, v in s.model_dump().items()}}
    lines = []
    for line in Path(template).read_text().splitlines():
        if line.lstrip().startswith("#"):  # comments may name ${VAR} without being filled
            continue
        try:
            lines.append(string.Template(line.replace("${hpc.", "${hpc_")).substitute(values))
        except KeyError as exc:
            raise HPCConfigError(f"{template}: environment variable {exc.args[0]} is not set") from None
    return yaml.safe_load("\n".join(lines))


def write_private_yaml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write a file that holds credentials: owner-only permissions from the first byte."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(dict(data), fh, sort_keys=False)
    p.chmod(0o600)
    return p


# ---- dask-jobqueue ----------------------------------------------------------------------------------------
def slurm_cluster_kwargs(settings: HPCSettings) -> dict[str, Any]:
    """Keyword arguments of dask_jobqueue.SLURMCluster for GPU sampling fan-out (one GPU per dask worker);
    use as DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=...)."""
    s = settings
    gres = f"gpu:{s.gpu_type}:1" if s.gpu_type else "gpu:1"
    prologue = [f"module load {m}" for m in [*s.modules, *s.gpu_modules]]
    prologue += [f"cd {_q(s.workdir)}"] + ([f"source {_q(Path(s.venv) / 'bin' / 'activate')}"] if s.venv else [])
    return {
        "queue": s.gpu_partition, "account": s.account, "cores": s.gpu_cpus, "processes": 1,
        "memory": s.gpu_mem or "16GB", "walltime": s.sample_time,
        "job_extra_directives": [f"--gres={gres}", *([f"--qos={s.qos}"] if s.qos else []), *s.extra_directives],
        "job_script_prologue": prologue, "log_directory": str(_log_path(s)),
    }


# ---- Prefect flow (runs on the login-node worker of the Slurm pool) ---------------------------------------
@flow(name="slurm-job", log_prints=True)
def slurm_flow(kind: Literal["train", "sample", "dft"] = "train", config_path: str = "configs/demo.yaml",
               store_path: str | None = None, args: list[str] | None = None,
               settings_path: str | None = "deploy/hpc/slurm.yaml", wait: bool = True) -> dict:
    """Render the sbatch script of `kind` (train | sample | dft), submit it and wait for the Slurm job."""
    settings = load_settings(settings_path)
    text = render_sbatch(kind, settings, config=config_path, store=store_path, args=args or [])
    logs = _log_path(settings)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    script = write_script(text, logs / "scripts", f"surfdiff-{kind}-{stamp}.sbatch")
    result = submit(script, log_dir=logs, wait=wait, on_submit=lambda j: print(f"submitted Slurm job {j}"))
    tail = scrub(_tail(result.log)) if wait else "(not waited for)"
    create_markdown_artifact(
        key=f"slurm-{kind}", description=f"Slurm {kind} job {result.job_id}",
        markdown=f"# Slurm {kind} job {result.job_id}\n\nexit code {result.returncode}, script `{script}`, "
                 f"log `{result.log}`\n\n```\n{tail}\n```\n")
    if wait and not result.ok:
        raise RuntimeError(f"Slurm job {result.job_id} failed with exit code {result.returncode}; see {result.log}")
    return asdict(result)


# ---- command line -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # arguments of the surfdiff command itself
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m deploy.hpc", description="Render surfdiff Slurm job scripts.",
                                epilog="example: python -m deploy.hpc render sample configs/demo.yaml "
                                       "--settings deploy/hpc/slurm.yaml -- --n 64")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print the sbatch script of one job")
    r.add_argument("kind", choices=KINDS)
    r.add_argument("config", nargs="?", default=None, help="surfdiff config (not for 'worker')")
    r.add_argument("--settings", default=None, help="HPC settings YAML (e.g. deploy/hpc/slurm.yaml)")
    r.add_argument("--store", default=None)
    r.add_argument("--job-name", default=None)
    r.add_argument("-o", "--output", default=None, help="write the script here instead of printing it")
    j = sub.add_parser("jfremote", help="install the jobflow-remote project (Mongo URI from the environment)")
    j.add_argument("--settings", default=None, help="HPC settings YAML (e.g. deploy/hpc/slurm.yaml)")
    j.add_argument("--template", default=str(Path(__file__).resolve().parent.parent / "deploy/hpc/jobflow-remote.yaml"))
    j.add_argument("-o", "--output", default="~/.jfremote/surfdiff.yaml", help="written with mode 0600")
    a = p.parse_args(argv)
    try:
        if a.command == "jfremote":
            out = write_private_yaml(jobflow_remote_project(a.template, settings=load_settings(a.settings)),
                                     a.output)
            print(f"wrote {out} (mode 0600; holds the Mongo URI): check it with `jf project check --errors`")
            return 0
        text = render_sbatch(a.kind, load_settings(a.settings), config=a.config, store=a.store, args=extra,
                             job_name=a.job_name)
    except HPCConfigError as exc:
        print(f"deploy.hpc: error: {exc}", file=sys.stderr)
        return 2
    if a.output:
        out = write_script(text, Path(a.output).parent, Path(a.output).name)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
