"""Process lifetimes: no process outlives the command that started it, whatever signal ends that command.

- A child that must die with its parent asks the kernel for a parent-death signal (Linux prctl
  PR_SET_PDEATHSIG): it covers SIGKILL of the parent, which no handler in the parent can. Elsewhere a thread
  polls the parent's pid instead.
- SIGTERM (Slurm at a job's time limit, `kill PID`) is turned into `Terminated`, a KeyboardInterrupt, so the
  command stops as it does on Ctrl-C: finished work saved, children stopped, one line, exit 143. A second
  SIGTERM while stopping is not caught: it ends the process at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


class Terminated(KeyboardInterrupt):
    """The command was asked to stop by a signal (SIGTERM): handled like Ctrl-C, exit 128 + signal."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded once (before any fork: nothing is loaded in a child between fork and exec)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
    return _libc.prctl


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Call in the child: it gets `sig` when its parent dies. `parent_pid` (the parent's pid, known to the
    parent) closes the race of a parent that died before this call: the child then exits at once."""
    prctl = _prctl()
    if prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
        if parent_pid is not None and os.getppid() != parent_pid:
            os._exit(1)
        return
    if parent_pid is not None:  # no prctl: watch the parent from a thread
        threading.Thread(target=_watch_parent, args=(parent_pid, sig), daemon=True, name="parent-watch").start()


def _watch_parent(parent_pid: int, sig: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), sig)


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that makes the child get `sig` when the calling thread's process
    dies (None where there is no prctl). The parent's pid is taken now, in the parent."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside: the first SIGTERM raises `Terminated` in the main thread (a second one kills). Outside the
    main thread, or where signals cannot be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # stopping takes a while: a second SIGTERM means now
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs. A zombie (exited, not yet reaped) does not: it answers kill(0) but does no work
    and holds nothing; one that is our child is reaped here. A process of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # an invalid pid: no such process
        return False
    with suppress(ChildProcessError):  # not our child: nothing to reap
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # gone since kill(0) where /proc exists; without /proc (macOS) kill(0) answered
        return not Path("/proc/self").exists()
