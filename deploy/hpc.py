"""HPC settings: every cluster setting of the Slurm route in one typed place, and its command line.

`SlurmSettings` come from a YAML file of flat keys (deploy/hpc/slurm.yaml) with SURFDIFF_HPC_* variables
above it. No secrets: the Mongo URI and friends stay in the environment, which sbatch hands to the jobs.
One route uses them: `surfdiff rss|train|sample|relax|run CONFIG --executor slurm --hpc-settings FILE`
(deploy/slurm.py: RSS and relaxations fan out, training and sampling are one job each on a GPU, the `gres`).
`python -m deploy.hpc settings --settings FILE` prints what the jobs will get.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from surfdiff_core.errors import ConfigError

ENV_PREFIX = "SURFDIFF_HPC_"
JobKind = Literal["rss", "relax", "train", "sample"]
_TOKEN = re.compile(r"^[A-Za-z0-9_.,:+=/@%-]+$")  # partition, account, qos, gres, memory: no shell syntax
_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s]+@", re.I)  # scheme://user:password@
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class HPCConfigError(ConfigError):
    """Invalid HPC settings (unknown key, bad value, a secret where none belongs): one line for the user."""


def minutes(value: int | str) -> int:
    """A Slurm time (MM, HH:MM:SS, D-HH[:MM[:SS]]) in whole minutes, rounded up as Slurm does."""
    if isinstance(value, int):
        return value
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # MM
        secs = a * 60
    return max(1, -(-secs // 60))


class SlurmSettings(BaseSettings):
    """Cluster settings of the HPC route. Every field can be set as SURFDIFF_HPC_<FIELD> (lists/dicts as JSON)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    folder: str = "runs/slurm"  # submitit's job folder (pickles, logs): on a filesystem the nodes share
    partition: str | None = None  # CPU jobs (RSS, relaxations); None = the cluster's default partition
    account: str | None = None  # usually SURFDIFF_HPC_ACCOUNT, so the file stays shareable
    qos: str | None = None
    modules: list[str] = Field(default_factory=list)  # `module load` in every job
    setup: list[str] = Field(default_factory=list)  # shell lines before each job, e.g. "source .venv/bin/activate"
    python: str | None = None  # interpreter on the nodes; default: the one that submits
    extra: dict[str, str] = Field(default_factory=dict)  # more sbatch options, e.g. {"constraint": "skylake"}

    batch_size: int = Field(1, ge=1)  # structures per job
    cpus_per_task: int = Field(1, ge=1)  # RSS and oracle relaxations
    mem: str | None = None  # per job, e.g. 4G
    rss_time: int = 30  # minutes (or a Slurm time string) per RSS job
    relax_time: int = 240  # per relaxation job (DFT)
    relax_tasks: int = Field(1, ge=1)  # MPI ranks of a relaxation job (VASP's `srun vasp_std` uses them)
    relax_modules: list[str] = Field(default_factory=list)  # e.g. vasp/6.4.2

    gpu_partition: str | None = None  # training and sampling; None = `partition`
    gres: str | None = "gpu:1"  # None: no GPU, the job asks for gpu_cpus CPUs only
    gpu_cpus: int = Field(8, ge=1)
    gpu_mem: str | None = None
    gpu_modules: list[str] = Field(default_factory=list)  # e.g. cuda/12.4
    train_time: int = 720
    sample_time: int = 240

    signal_delay_s: int = Field(90, ge=0)  # USR2 this long before the time limit: the job reports its timeout
    poll_s: float = Field(5.0, gt=0)  # how often the submitting process looks for finished jobs' results
    state_poll_s: float = Field(60.0, gt=0)  # how often it asks sacct/scontrol (a cancelled job has no result)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment wins over the shared file; no .env files

    @field_validator("rss_time", "relax_time", "train_time", "sample_time", mode="before")
    @classmethod
    def _minutes(cls, v: int | str) -> int:
        return minutes(v)

    @field_validator("partition", "gpu_partition", "account", "qos", "gres", "mem", "gpu_mem")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN.match(v):
            raise ValueError(f"{v!r} contains characters not allowed in a Slurm value")
        return v or None

    @field_validator("modules", "relax_modules", "gpu_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        if bad := [m for m in v if not _TOKEN.match(m)]:
            raise ValueError(f"module name {bad[0]!r} contains characters not allowed")
        return v

    @model_validator(mode="after")
    def _no_credentials(self) -> SlurmSettings:
        for name, value in self:
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            if any(isinstance(x, str) and (_CREDENTIALS.search(x) or "\n" in x) for x in items):
                raise ValueError(f"{name}: one line each, and no URI with credentials: keep secrets in "
                                 f"environment variables (e.g. SURFDIFF_MONGO_URI)")
        return self


def load_settings(path: str | Path | None = None, **overrides: Any) -> SlurmSettings:
    """Settings from a YAML file of flat keys (deploy/hpc/slurm.yaml), `overrides` above it, SURFDIFF_HPC_*
    variables above both. Unknown keys or variables fail with one line naming them."""
    fields = list(SlurmSettings.model_fields)
    for key in os.environ:
        if key.upper().startswith(ENV_PREFIX) and key.upper()[len(ENV_PREFIX):].lower() not in fields:
            close = difflib.get_close_matches(key.upper()[len(ENV_PREFIX):].lower(), fields, n=1)
            raise HPCConfigError(f"unknown environment variable {key}"
                                 + (f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""))
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
        return SlurmSettings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key, where = ".".join(str(p) for p in err["loc"]), path or "HPC settings"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, fields, n=1)
            raise HPCConfigError(f"{where}: unknown key {key!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")) from None
        raise HPCConfigError(f"{where}: {key}: {err['msg']}") from None


def job_parameters(s: SlurmSettings, kind: JobKind) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters of one kind of job."""
    gpu = kind in ("train", "sample")
    modules = [*s.modules, *(s.gpu_modules if gpu else s.relax_modules if kind == "relax" else [])]
    p: dict[str, Any] = {
        "job_name": f"surfdiff-{kind}", "partition": (s.gpu_partition or s.partition) if gpu else s.partition,
        "time": {"rss": s.rss_time, "relax": s.relax_time, "train": s.train_time, "sample": s.sample_time}[kind],
        "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": s.gpu_cpus if gpu else s.cpus_per_task,
        "mem": s.gpu_mem if gpu else s.mem, "account": s.account, "qos": s.qos,
        "gres": s.gres if gpu else None, "signal_delay_s": s.signal_delay_s,
        "setup": [f"module load {m}" for m in modules] + list(s.setup), "stderr_to_stdout": True,
        "additional_parameters": dict(s.extra),
    }
    if kind == "relax" and s.relax_tasks > 1:  # MPI DFT: python in the batch step, VASP's srun uses the ranks
        p.update(ntasks_per_node=s.relax_tasks, use_srun=False)
    return {k: v for k, v in p.items() if v is not None}


# ---- command line: the resolved settings ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.hpc settings [--settings FILE]` prints the settings the jobs get. `train|sample` were
    replaced by `surfdiff train|sample CONFIG --executor slurm --hpc-settings FILE`: one line naming it, exit 2."""
    import argparse
    import shlex
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # the old route's arguments of the surfdiff command
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m deploy.hpc", description="the HPC settings of the Slurm route",
                                epilog="training and sampling on Slurm: surfdiff train|sample CONFIG --executor slurm "
                                       "--hpc-settings FILE (see deploy/README.md)")
    p.add_argument("kind", choices=["settings", "train", "sample"], help="'settings' prints the resolved settings")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--settings", default=None, help="HPC settings YAML (e.g. deploy/hpc/slurm.yaml)")
    p.add_argument("--no-wait", action="store_true", help=argparse.SUPPRESS)
    a, unknown = p.parse_known_args(argv)
    if a.kind == "settings" and (unknown or extra):
        p.error(f"unrecognized arguments: {' '.join(unknown + extra)}")
    if a.kind != "settings":  # the second command line is gone: say what replaces it, before anything else
        line = [f"surfdiff {a.kind}", shlex.quote(a.config) if a.config else "CONFIG", "--executor slurm",
                f"--hpc-settings {shlex.quote(a.settings) if a.settings else 'FILE'}",
                *map(shlex.quote, unknown + extra), *(["--no-wait"] if a.no_wait else [])]
        print(f"deploy.hpc: error: `python -m deploy.hpc {a.kind}` was replaced by `{' '.join(line)}`",
              file=sys.stderr)
        return 2
    try:
        settings = load_settings(a.settings)
    except HPCConfigError as exc:
        print(f"deploy.hpc: error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(settings.model_dump(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
