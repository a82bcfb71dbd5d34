"""Processes of `surfdiff serve`: free ports, process trees, children tied to their parent, the pid file, the guard.

Every Prefect process runs in its own process group and their descendants are tracked, so stopping a child leaves
nothing behind. A hard kill of `serve` leaves nothing either: the children get a parent-death signal, a small guard
process kills whatever is left (flow runs included), and the next `serve` of the same Prefect home cleans up after
an earlier one it finds in PREFECT_HOME/serve.pids.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from surfdiff_core.errors import ConfigError
from surfdiff_core.lifetime import pid_alive

HOST = "127.0.0.1"  # never anything wider: loopback plus a password, reach it from elsewhere through SSH
PIDS_FILE = "serve.pids"  # under PREFECT_HOME: the running serve, its guard and children (pid + start time)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """All processes below `pid`: flow runs start in sessions of their own, out of reach of killpg."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: fall back to /proc
        pass
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pids: list[int], sig: int, group_of: int | None = None) -> None:
    if group_of is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group_of, sig)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


# ---- children tied to this process --------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (Linux only)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: no dlsym in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot: with the pid, it names one process (pids get reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_process(entry: dict[str, Any]) -> bool:
    return entry.get("start") is not None and _start_time(int(entry["pid"])) == entry["start"] \
        and pid_alive(int(entry["pid"]))


def write_pids(home: Path, entries: dict[str, int]) -> None:
    """PREFECT_HOME/serve.pids: what a later serve (or the guard) may kill, each pid with its start time."""
    data = {name: {"pid": pid, "start": _start_time(pid)} for name, pid in entries.items()}
    tmp = home / f".{PIDS_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(home / PIDS_FILE)


def _read_pids(home: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((home / PIDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kill_trees(roots: list[int], extra: set[int] | None = None, grace: float = 3.0) -> int:
    """SIGTERM `roots`, their process groups and descendants (plus `extra`), SIGKILL what is left after `grace`."""
    tree = set(extra or ()) | set(roots)
    for pid in roots:
        tree |= set(_descendants(pid))
    for pid in roots:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:  # leaders of their own group (start_new_session): the whole group
                os.killpg(pid, signal.SIGTERM)
    _signal(sorted(tree), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    left = [p for p in tree if pid_alive(p)]
    _signal(left, signal.SIGKILL)
    return len(tree)


def clean_stale(home: Path, log: Callable[[str], None] = print) -> int:
    """Stop what an earlier, hard-killed serve of this Prefect home left running; refuse if it still runs."""
    entries = _read_pids(home)
    if not entries:
        return 0
    serve = entries.get("serve")
    if serve and serve.get("pid") != os.getpid() and _same_process(serve):
        raise ConfigError(f"another surfdiff serve (pid {serve['pid']}) uses {home}: stop it, or pass "
                          "--prefect-home")
    stale = [int(e["pid"]) for name, e in entries.items() if name != "serve" and _same_process(e)]
    killed = _kill_trees(stale) if stale else 0
    (home / PIDS_FILE).unlink(missing_ok=True)
    if killed:
        log(f"stopped {killed} processes left behind by an earlier surfdiff serve of {home}")
    return killed


def spawn_guard(home: Path, root: Path, logdir: Path) -> subprocess.Popen:
    """The guard: a tiny process that outlives a hard-killed serve just long enough to stop its children."""
    log = (logdir / "guard.log").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; from deploy.processes import guard_main; guard_main(*sys.argv[1:])",
             str(os.getpid()), str(home)],
            cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a kill of serve's group must not take the guard with it
            preexec_fn=_pdeathsig_setter())
    finally:
        log.close()


class _Stop(Exception):
    pass


def guard_main(parent: str, home: str) -> None:
    """Body of the guard: wait for serve to die, then kill the children listed in serve.pids and every
    descendant seen while they ran (flow runs leave the worker's process tree when the worker dies first)."""
    parent_pid, home_path = int(parent), Path(home)

    def _on_term(_signum: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, _on_term)  # the parent-death signal, or serve stopping us on a clean exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: dict[int, int | None] = {}
    try:
        while os.getppid() == parent_pid:
            for name, e in _read_pids(home_path).items():
                if name not in ("serve", "guard") and _same_process(e):
                    for pid in [int(e["pid"]), *_descendants(int(e["pid"]))]:
                        seen.setdefault(pid, _start_time(pid))
            time.sleep(1.0)
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    entries = _read_pids(home_path)  # gone after a clean stop: nothing to do
    serve = entries.get("serve")
    if not entries or (serve and _same_process(serve)):
        return
    roots = [int(e["pid"]) for name, e in entries.items() if name not in ("serve", "guard") and _same_process(e)]
    extra = {pid for pid, start in seen.items() if start is not None and _start_time(pid) == start}
    _kill_trees(roots, extra)
    (home_path / PIDS_FILE).unlink(missing_ok=True)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    _fh: IO[Any]

    def stop(self, timeout: float) -> None:
        """SIGTERM to the group and every descendant, SIGKILL to whatever is left after `timeout`."""
        pid = self.proc.pid
        tree = _descendants(pid)
        _signal(tree, signal.SIGTERM, group_of=pid)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(timeout, 0.1))
        tree = sorted(set(tree) | set(_descendants(pid)))
        while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
            time.sleep(0.2)
        _signal(tree, signal.SIGKILL, group_of=pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._fh.close()


def spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path, logdir: Path) -> Child:
    log = logdir / f"{name}.log"
    fh = log.open("ab")
    # A new session: Ctrl-C in the terminal reaches only `surfdiff serve`, which then stops the children in
    # order (worker before server), and killpg reaches everything the child starts in its group.
    # The parent-death signal stops the child even when `surfdiff serve` is killed with SIGKILL.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_pdeathsig_setter())
    return Child(name, proc, log, fh)
