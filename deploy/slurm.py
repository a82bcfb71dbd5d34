"""A `concurrent.futures.Executor` whose calls run as Slurm jobs, through submitit.

`batch_size` calls per job (the settings of deploy/hpc.py); submitit pickles the calls and their results
through the shared job folder. The RSS, relaxation and baseline stages take it as `executor=`, opened by
`open_executor` from the `ExecutorSpec` a command or flow resolved. A job that Slurm cancels or kills at its
time limit fails its futures with `SlurmJobLost`, naming the job and its state; the stages record those and a
rerun redoes only them. `submit_stage_job` runs training or sampling as one GPU job
(`surfdiff train|sample CONFIG --executor slurm`, flows/cli_slurm.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.hpc import JobKind, SlurmSettings, job_parameters
from surfdiff_core.executors import ExecutorSpec


# ---- submitit, with job states from scontrol where the site keeps no accounting ------------------------------
def _submitit_classes(state_poll_s: float = 60.0):
    from submitit.slurm.slurm import SlurmExecutor as _SubmititExecutor
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    class StateWatcher(SlurmInfoWatcher):
        """submitit asks sacct; without slurmdbd sacct fails and a cancelled job would look alive forever,
        so then ask scontrol, which knows finished jobs for MinJobAge seconds."""

        def update(self) -> None:
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not ids:
                return
            self._num_calls += 1
            sacct = subprocess.run(self._make_command() or [], capture_output=True, text=True, timeout=120)
            if sacct.returncode == 0:
                self._info_dict.update(self.read_info(sacct.stdout))
            else:
                for job_id in ids:
                    self._info_dict.update(_scontrol_states(job_id))
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    class Job(SlurmJob):
        watcher = StateWatcher(delay_s=int(max(1, state_poll_s)))

    class Submitit(_SubmititExecutor):
        job_class = Job

    return Submitit


def _submitit_executor(settings: SlurmSettings, kind: JobKind) -> Any:
    """submitit's executor for `kind` jobs, in <folder>/<kind>; no requeue on timeout (nothing checkpoints)."""
    executor = _submitit_classes(settings.state_poll_s)(folder=Path(settings.folder) / kind, max_num_timeout=0,
                                                        python=settings.python)
    executor.update_parameters(**job_parameters(settings, kind))
    return executor


def _scontrol_states(job_id: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         timeout=60)
    if out.returncode and "Invalid job id" in out.stderr:  # purged: done; the result file tells how it ended
        return {job_id: {"JobID": job_id, "State": "PURGED"}}
    states = {}
    for line in out.stdout.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in rec:
            states[rec["JobId"]] = {"JobID": rec["JobId"], "State": rec.get("JobState", "UNKNOWN")}
    return states


class SlurmJobLost(RuntimeError):
    """The Slurm job of a call ended without its result: cancelled, out of time, node failure."""


class RemoteCallError(RuntimeError):
    """The call itself raised inside its Slurm job (the job and the other calls of its batch went on)."""


def run_batch(calls: list[tuple[Callable, tuple, dict]]) -> list[tuple[bool, Any]]:
    """What a Slurm job runs: its calls one after another, each one's error kept apart from the others."""
    out: list[tuple[bool, Any]] = []
    for fn, args, kwargs in calls:
        try:
            out.append((True, fn(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - reported to that call's future
            out.append((False, f"{type(exc).__name__}: {exc}"[:1000]))
    return out


@dataclass
class _Call:
    future: Future
    fn: Callable
    args: tuple
    kwargs: dict


class SlurmExecutor(Executor):
    """Calls as Slurm jobs: `settings.batch_size` calls per job, a partial batch submitted once no call has
    come for `flush_after_s`. Use it as a context manager; leaving on an error cancels the jobs (scancel)."""

    def __init__(self, settings: SlurmSettings, kind: JobKind = "rss", *, flush_after_s: float = 0.5) -> None:
        self.settings, self.kind, self.flush_after_s = settings, kind, flush_after_s
        self._submitit = _submitit_executor(settings, kind)
        self.jobs: list[Any] = []  # every submitit job submitted, for the record (job_id, state, paths)
        self._pending: list[_Call] = []
        self._running: dict[Any, list[Future]] = {}
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self._watcher: threading.Thread | None = None
        self._closed = False

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a SlurmExecutor that was shut down")
            future: Future = Future()
            self._pending.append(_Call(future, fn, args, kwargs))
            if len(self._pending) >= self.settings.batch_size:
                self._flush()
            else:
                self._restart_timer()
            return future

    def flush(self) -> None:
        """Submit the calls waiting for a full batch now."""
        with self._lock:
            self._flush()

    def _restart_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.flush_after_s, self.flush)
        self._timer.daemon = True
        self._timer.start()

    def _flush(self) -> None:
        calls = [c for c in self._pending if c.future.set_running_or_notify_cancel()]
        self._pending = []
        if not calls:
            return
        try:
            job = self._submitit.submit(run_batch, [(c.fn, c.args, c.kwargs) for c in calls])
        except Exception as exc:  # noqa: BLE001 - sbatch refused: these calls fail, the caller decides
            for c in calls:
                c.future.set_exception(exc)
            return
        self.jobs.append(job)
        self._running[job] = [c.future for c in calls]
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="slurm-executor", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            with self._lock:
                if not self._running:
                    self._watcher = None
                    return
                running = list(self._running.items())
            for job, futures in running:
                if job.done():
                    _settle(job, futures)
                    with self._lock:
                        self._running.pop(job, None)
            time.sleep(self.settings.poll_s)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if cancel_futures:
                for c in self._pending:
                    c.future.cancel()
                self._pending = []
                for job, futures in self._running.items():
                    job.cancel(check=False)  # scancel
                    for f in futures:
                        if not f.done():
                            f.set_exception(SlurmJobLost(f"Slurm job {job.job_id} cancelled by the caller"))
                self._running.clear()
            else:
                self._flush()
            watcher = self._watcher
        if wait and watcher is not None:
            watcher.join()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)
        return False


def _settle(job: Any, futures: list[Future]) -> None:
    try:
        outcomes = job.result()
    except Exception as exc:  # noqa: BLE001 - the job is gone: every call of it is lost
        state = job.watcher.get_state(job.job_id, mode="force")
        lost = SlurmJobLost(f"Slurm job {job.job_id} ended {state}: {_reason(str(exc))}"[:500])
        for f in futures:
            f.set_exception(lost)
        return
    for f, (ok, value) in zip(futures, outcomes, strict=True):
        if ok:
            f.set_result(value)
        else:
            f.set_exception(RemoteCallError(f"in Slurm job {job.job_id}: {value}"))


def _reason(text: str) -> str:
    """The telling line of a lost job's log: slurmstepd's `*** JOB n ... CANCELLED ... ***`, submitit's
    timeout note, else the last line."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    telling = [x for x in lines if x.startswith("slurmstepd") or "***" in x or "timed-out" in x]
    return (telling or lines or ["no result"])[-1]


def failure_line(exc: BaseException) -> str:
    """One line for a job's failure: the last line of the call's traceback where it raised in the job
    (submitit's FailedJobError), else the telling line of a lost job or of sbatch's refusal."""
    text = str(exc)
    if "failed during processing with trace" in text:  # the trace sits between two lines of dashes
        lines = text.splitlines()
        rules = [i for i, x in enumerate(lines) if x.strip() and not x.strip("-")]
        if len(rules) >= 2:
            trace = [x.strip() for x in lines[rules[0] + 1:rules[1]] if x.strip()]
            if trace:
                return trace[-1]
    return _reason(text) if text.strip() else type(exc).__name__


def make_executor(settings: SlurmSettings | str | Path | None, kind: JobKind) -> SlurmExecutor:
    """An executor for `kind` jobs from settings or a settings file (None: defaults + SURFDIFF_HPC_*)."""
    from deploy.hpc import load_settings

    if not isinstance(settings, SlurmSettings):
        settings = load_settings(settings)
    return SlurmExecutor(settings, kind)


# ---- training and sampling: one job on a GPU -----------------------------------------------------------------
def run_surfdiff(argv: Sequence[str]) -> int:
    """What a train/sample job runs: the `surfdiff` command line of this checkout, in a child process
    (deploy/ never imports flows/, which imports deploy/), in the job's directory: the one it was submitted
    from, so relative paths (the config's store, --store) mean what they meant there. Its stderr goes to the
    job log as it comes; a failure raises with the command's own last line (its one-line error)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env, stderr=subprocess.PIPE)
    err, out, tail = proc.stderr, getattr(sys.stderr, "buffer", None), b""
    for chunk in iter(lambda: err.read1(65536), b""):
        tail = (tail + chunk)[-4096:]
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
    code = proc.wait()
    if code:
        last = [x.strip() for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        raise RuntimeError(f"surfdiff {argv[0] if argv else ''} exited with {code}"
                           + (f": {last[-1][:500]}" if last else "; see the job log"))
    return code


def submit_stage_job(kind: JobKind, config: str, settings: SlurmSettings, args: Sequence[str] = ()) -> Any:
    """`surfdiff train|sample CONFIG` as one Slurm job with the settings' GRES (CPUs only where gres is None).
    Returns the submitit job: `.job_id`, `.result()` waits, `.paths.stdout` is its log."""
    if kind not in ("train", "sample"):
        raise ValueError(f"GPU jobs are 'train' or 'sample', not {kind!r}")
    executor = _submitit_executor(settings, kind)
    device = "cuda" if settings.gres else "cpu"
    return executor.submit(run_surfdiff, [kind, str(Path(config).resolve()), "--device", device, *args])


def stage_in_job(kind: JobKind, cfg_json: dict[str, Any], call: str, args: tuple, kwargs: dict) -> Any:
    """Inside a train/sample job: open the study's store (shared filesystem or MongoDB) and run the stage."""
    from surfdiff_core.config import config_from_dict
    from surfdiff_core.stages import sample, train
    from surfdiff_core.stages.common import open_study_store

    cfg = config_from_dict(cfg_json, "the job's study config")  # a bad one: the one-line ConfigError
    functions = {"train": train.run, "sample": sample.sample_one}
    with open_study_store(cfg) as store:
        return functions[call](cfg, store, *args, **kwargs)


def run_stage_as_job(kind: JobKind, spec: ExecutorSpec, cfg: Any, call: str, *args: Any, **kwargs: Any) -> Any:
    """Training or sampling of one target as one Slurm job with the settings' GRES (`--device cuda` there,
    CPUs only where gres is None); waits for it and returns the stage's result."""
    from deploy.hpc import load_settings

    settings = load_settings(spec.hpc_settings)
    kwargs["device"] = "cuda" if settings.gres else "cpu"
    job = _submitit_executor(settings, kind).submit(stage_in_job, kind, cfg.model_dump(mode="json"), call, args,
                                                    {**kwargs, "progress": False})
    return job.result()


@contextlib.contextmanager
def open_executor(spec: ExecutorSpec, kind: JobKind) -> Iterator[Executor | None]:
    """The one factory of the executor a command or flow chose (`spec`, resolved at its edge) for `kind` jobs:
    None for local (the stage's own local way), a SlurmExecutor for slurm (settings from `spec.hpc_settings`,
    then SURFDIFF_HPC_*), shut down on leaving."""
    if not spec.on_slurm:
        yield None
        return
    with make_executor(spec.hpc_settings, kind) as executor:
        yield executor
