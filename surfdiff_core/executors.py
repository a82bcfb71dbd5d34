"""Where the oracle work of the stages that fan out (RSS, relax, baseline) runs.

One typed choice, `ExecutorSpec`, made once at the edge from the command line's `--executor/--hpc-settings` or a
flow's `executor/hpc_settings` parameters, and opened there into a `concurrent.futures.Executor` by
`deploy.slurm.open_executor` (deploy/ builds the Slurm one: the library never imports deploy/). The stages take
that Executor, or None for their own local way: the RSS (and so the baseline arm) in `rss.workers` local
processes (`local_processes` here), the relaxations in one jobflow flow here.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from threadpoolctl import threadpool_limits

from surfdiff_core.errors import ConfigError
from surfdiff_core.lifetime import die_with_parent

ExecutorKind = Literal["local", "slurm"]
EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)


@dataclass(frozen=True)
class ExecutorSpec:
    """`local` (this machine) or `slurm` (jobs with the settings of `hpc_settings`, then SURFDIFF_HPC_*).
    Frozen and plain, so a flow hands it to its tasks as a value."""

    kind: ExecutorKind = "local"
    hpc_settings: str | None = None  # the Slurm settings file (deploy/hpc/slurm.yaml); None: defaults + env

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ConfigError(f"unknown executor {self.kind!r}: 'local' or 'slurm'")
        if isinstance(self.hpc_settings, Path):  # the same value as the flow parameter's string
            object.__setattr__(self, "hpc_settings", str(self.hpc_settings))

    @property
    def on_slurm(self) -> bool:
        return self.kind == "slurm"


# ---- local processes ----------------------------------------------------------------------------------------
_LIMITS: list[Any] = []  # a worker's BLAS limit, kept alive for the worker's life


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    # A worker dies with the command that started it, even when that one is killed (SIGKILL, no cleanup runs).
    die_with_parent(parent_pid)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    # Relaxations of small slabs: multi-threaded BLAS (BFGS's eigh) only adds overhead, ~20x here.
    _LIMITS.append(threadpool_limits(1, user_api="blas"))


@contextlib.contextmanager
def local_processes(workers: int) -> Iterator[ProcessPoolExecutor]:
    """`workers` fresh processes for oracle work, each with its share of the cores and one BLAS thread, dying with
    this one. Left normally, it waits for them; interrupted (Ctrl-C, SIGTERM, an error), it stops them at once."""
    ctx = mp.get_context("spawn")  # torch-based oracles are not fork-safe
    threads = max(1, (mp.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, os.getpid()))
    try:
        yield pool
    except BaseException:
        _stop_pool(pool)  # running relaxations are redone by a rerun
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now instead of waiting for their running relaxations (hours on DFT): the command is
    being interrupted, and what they were computing is not in the store, so a rerun redoes exactly that."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # Python < 3.14 has no terminate_workers
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
