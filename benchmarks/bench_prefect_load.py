"""Prefect under load: one flow of N small tasks through a local Prefect server, every task run accounted for.

    .venv/bin/python benchmarks/bench_prefect_load.py [--n 500] [--workers 8] [--database sqlite|postgresql]
        [--work-ms 5] [--settle S] [--timeout 900] [--verbose]

The server is started the way `surfdiff serve` starts it (deploy/serve.py `start_serve`: `prefect server start` on
127.0.0.1, the API password, every process in its own group, tied to this one), on a free port with a temporary
PREFECT_HOME, without worker or deployments. `--database sqlite` (default): a fresh SQLite file in that home, as
serve uses. `--database postgresql`: a throwaway cluster of Debian's `postgresql` package (installed with apt-get
when missing and run as root), run as the `postgres` user in a temporary directory, listening on 127.0.0.1 and a
free port only, trust authentication for 127.0.0.1 only; Prefect reaches it through asyncpg.

One flow (ThreadPoolTaskRunner, `--workers` threads) submits N tasks; each does `--work-ms` of numpy work and
returns its index and a checksum. After the flow, the server is polled (at most `--settle` s) until it has recorded
a final state for every task run (Prefect 3 reports task runs as events, which the server writes asynchronously),
then the flow's task runs (by the ids the client gave them) are counted by their state on the server: Completed,
Failed, Crashed, not final and missing. Printed: N, those counts, the flow's wall time and task runs per second,
the time the server needed to catch up (and the end-to-end rate), database-lock errors and tracebacks in the
server log, the database size and its task_run rows, and the CPU seconds of this process and of the server
(+ postgres) during the flow and while catching up.

Exit 0 when all N task runs are Completed on the server, 1 when any is failed, crashed, not final or missing,
2 when the stack could not be started, 124 past `--timeout`, 143 on SIGTERM. Server, guard and PostgreSQL are
stopped and the temporary directories removed in every case (the server, its guard and postgres also die with this
process if it is killed hard).
Only loopback traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import platform
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # deploy/ and surfdiff_core/ of this checkout
    sys.path.insert(0, str(ROOT))

from deploy.processes import HOST, _pdeathsig_setter, free_port  # noqa: E402
from surfdiff_core.errors import SurfdiffError  # noqa: E402


class BenchTimeout(BaseException):
    """--timeout passed. A BaseException, so Prefect's engine crashes the flow run and re-raises it."""


class Terminated(BaseException):
    """SIGTERM: cleaned up like Ctrl-C, exit 143."""


# ---- PostgreSQL: a throwaway cluster of Debian's package ------------------------------------------------------
def _pg_bindir() -> Path | None:
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def ensure_postgresql() -> Path:
    """The bin directory of Debian's PostgreSQL; `apt-get install -y postgresql` first when it is missing."""
    if (bindir := _pg_bindir()) is not None:
        return bindir
    if os.geteuid() != 0:
        raise SurfdiffError("PostgreSQL is not installed: `apt-get install -y postgresql` (as root)")
    print("PostgreSQL missing: apt-get install -y postgresql ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "postgresql"], check=True, env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=600)
    if (bindir := _pg_bindir()) is None:
        raise SurfdiffError("apt-get installed postgresql, but no initdb was found")
    return bindir


@dataclass
class PostgresCluster:
    """initdb + postgres in a temporary directory, 127.0.0.1 only; `stop()` shuts it down and removes it."""

    bindir: Path
    tmp: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    user: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{HOST}:{self.port}/prefect"

    def _psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run([str(self.bindir / "psql"), "-h", HOST, "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-tAXc", sql], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise SurfdiffError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def start(self) -> None:
        if os.geteuid() == 0:  # postgres refuses to run as root: the package's `postgres` user owns the cluster
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data, log = self.tmp / "data", self.tmp / "postgres.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        init = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                               "--locale=C.UTF-8", "--auth=reject"], cwd=self.tmp, env=env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL, **self.user)
        if init.returncode != 0:
            raise SurfdiffError(f"initdb failed: {init.stderr.strip()[-500:]}")
        # Only TCP from 127.0.0.1, without password, in this throwaway cluster; no socket access at all.
        (data / "pg_hba.conf").write_text("host all postgres 127.0.0.1/32 trust\n")
        self.port = free_port()
        fh = log.open("ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(data), "-c", f"listen_addresses={HOST}",
                 "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.tmp}"],
                cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig_setter(), **self.user)  # dies with this process
        finally:
            fh.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SurfdiffError(f"postgres exited with code {self.proc.returncode}: "
                                    f"{log.read_text(errors='replace')[-500:]}")
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", HOST, "-p", str(self.port), "-q"],
                                   stdin=subprocess.DEVNULL, timeout=30)
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SurfdiffError("postgres did not accept connections within 60 s")
            time.sleep(0.3)
        self._psql("CREATE DATABASE prefect")
        self._psql("CREATE EXTENSION IF NOT EXISTS pg_trgm", db="prefect")  # Prefect's migrations need it

    def size_bytes(self) -> int:
        return int(self._psql("SELECT pg_database_size('prefect')"))

    def task_run_rows(self) -> int:
        return int(self._psql("SELECT count(*) FROM task_run", db="prefect"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


# ---- the flow ---------------------------------------------------------------------------------------------------
def work(i: int, work_ms: float) -> tuple[int, float]:
    """A little real work: 64x64 matrix products for `work_ms` ms; the index and a checksum."""
    rng = np.random.default_rng(i)
    a = rng.standard_normal((64, 64)) / 8.0
    b = a.copy()
    end = time.perf_counter() + work_ms / 1000.0
    while True:
        b = np.tanh(b @ a)
        if time.perf_counter() >= end:
            return i, float(np.abs(b).sum())


def build_flow(workers: int) -> Any:
    """The load flow; prefect is imported here, after the environment points it at the benchmark's server."""
    from prefect import flow, task
    from prefect.futures import wait
    from prefect.task_runners import ThreadPoolTaskRunner

    load_task = task(work, name="load-task", task_run_name="load-{i}", persist_result=False)

    @flow(name="prefect-load", persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=workers))
    def prefect_load(n: int, work_ms: float) -> dict[str, Any]:
        futures = [load_task.submit(i, work_ms) for i in range(n)]
        wait(futures)
        seen: set[int] = set()
        states: Counter[str] = Counter()
        for fut in futures:
            states[fut.state.type.value] += 1
            if fut.state.is_completed():
                seen.add(fut.result()[0])
        return {"states": dict(states), "distinct results": len(seen), "ids": [str(f.task_run_id) for f in futures]}

    return prefect_load


# ---- counting on the server ---------------------------------------------------------------------------------
def server_states(client: Any, ids: list[str]) -> dict[str, str]:
    """State type of each task run the server holds, by id (200 ids a query: no paging while rows arrive)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    out: dict[str, str] = {}
    for k in range(0, len(ids), 200):
        chunk = ids[k:k + 200]
        for r in client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=chunk)), limit=200):
            out[str(r.id)] = r.state_type.value if r.state_type is not None else "NONE"
    return out


def tally(ids: list[str], n: int, states: dict[str, str]) -> dict[str, int]:
    counts = Counter({"Completed": 0, "Failed": 0, "Crashed": 0, "not final": 0, "missing": n - len(ids)})
    names = {"COMPLETED": "Completed", "FAILED": "Failed", "CRASHED": "Crashed"}
    for i in ids:
        if i not in states:
            counts["missing"] += 1
        else:
            counts[names.get(states[i], "not final")] += 1
    return dict(counts)


def settle(client: Any, ids: list[str], n: int, timeout: float) -> tuple[dict[str, int], float]:
    """Poll until the server holds a final state for all n task runs, or `timeout` s passed."""
    t0 = time.monotonic()
    while True:
        counts = tally(ids, n, server_states(client, ids))
        if counts["missing"] + counts["not final"] == 0 or time.monotonic() - t0 > timeout:
            return counts, time.monotonic() - t0
        time.sleep(1.0)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes and their descendants (0 for any that is gone)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


def _mb(b: int) -> str:
    return f"{b / 2**20:.1f} MB"


# ---- main -------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, tmp: Path) -> int:
    from deploy.auth import resolve_auth
    from deploy.serve import _FOREIGN_SETTINGS, prefect_env, start_serve

    pg: PostgresCluster | None = None
    handles = None
    try:
        extra: dict[str, str] = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        if args.database == "postgresql":
            try:
                import asyncpg  # noqa: F401
            except ImportError:
                raise SurfdiffError("asyncpg is missing: .venv/bin/python -m pip install asyncpg") from None
            # Its own directory (handed to the postgres user), not under `tmp` (private to this user).
            pg = PostgresCluster(ensure_postgresql(), Path(tempfile.mkdtemp(prefix="surfdiff-prefect-load-pg-")))
            t = time.perf_counter()
            pg.start()
            print(f"PostgreSQL ({pg.bindir.parent.name}) on {HOST}:{pg.port}, ready in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            extra |= {"PREFECT_SERVER_DATABASE_CONNECTION_URL": pg.url, "PREFECT_API_DATABASE_CONNECTION_URL": pg.url}
        home, port = tmp / "prefect", free_port()
        auth = resolve_auth(home)
        # This process runs the flow: same settings as the server's clients, before prefect is first imported.
        for key in _FOREIGN_SETTINGS:
            os.environ.pop(key, None)
        os.environ.update(prefect_env(home, port, extra={**extra, "PREFECT_API_AUTH_STRING": auth}))
        if not args.verbose:  # Prefect logs each task run at INFO: still sent to the API, not shown here
            os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
        t = time.perf_counter()
        handles = start_serve(port=port, prefect_home=home, worker=False, register=False, extra_env=extra,
                              health_timeout=min(300.0, args.timeout), log=lambda _m: None)
        print(f"Prefect server on {handles.url} ({args.database}), healthy in {time.perf_counter() - t:.1f} s",
              flush=True)
        import prefect

        prefect_load = build_flow(args.workers)
        print(f"flow: {args.n} tasks of {args.work_ms:g} ms numpy, ThreadPoolTaskRunner({args.workers}) ...",
              flush=True)
        server_pids = [handles.server.proc.pid] if handles.server else []
        if pg is not None and pg.proc is not None:
            server_pids.append(pg.proc.pid)
        cpu0 = (time.process_time(), cpu_seconds(server_pids))
        t = time.perf_counter()
        state = prefect_load(args.n, args.work_ms, return_state=True)
        wall = time.perf_counter() - t
        cpu1 = (time.process_time(), cpu_seconds(server_pids))
        flow_run_id = state.state_details.flow_run_id
        local = state.result(raise_on_failure=False) if state.is_completed() else {}
        ids = local.get("ids", []) if isinstance(local, dict) else []
        with handles.client() as client:
            counts, lag = settle(client, ids, args.n, args.settle)
            server_flow_state = client.read_flow_run(flow_run_id).state_type.value
        cpu2 = (time.process_time(), cpu_seconds(server_pids))
        log_text = handles.server.log.read_text(errors="replace") if handles.server else ""
        if args.database == "sqlite":
            db = sum(p.stat().st_size for p in home.glob("prefect.db*"))
            with contextlib.closing(sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True)) as con:
                rows = int(con.execute("SELECT count(*) FROM task_run").fetchone()[0])
        else:
            db, rows = (pg.size_bytes(), pg.task_run_rows()) if pg else (0, 0)

        ok = counts["Completed"] == args.n and state.is_completed() and local.get("distinct results") == args.n
        print(f"\nPrefect {prefect.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"database {args.database}")
        print(f"N = {args.n} task runs, {args.workers} threads, {args.work_ms:g} ms work each")
        print(f"flow run: {state.type.value} (client), {server_flow_state} (server); client-side task states "
              f"{local.get('states')}, {local.get('distinct results')} distinct results")
        print("server task runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"wall time of the flow: {wall:.1f} s  ({args.n / wall:.1f} task runs/s)")
        behind = counts["missing"] + counts["not final"]
        print(f"server caught up {lag:.1f} s after the flow returned"
              + (f" (gave up after --settle {args.settle:g} s)" if behind else "")
              + f"; all recorded after {wall + lag:.1f} s ({args.n / (wall + lag):.1f} task runs/s end to end)")
        print(f"server log: {log_text.count('database is locked')} 'database is locked', "
              f"{log_text.count('Traceback')} tracebacks, {log_text.count(' ERROR ')} ERROR lines")
        print(f"database: {_mb(db)}, {rows} rows in its task_run table")
        print(f"CPU s during the flow: this process {cpu1[0] - cpu0[0]:.1f}, server{' + postgres' if pg else ''} "
              f"{cpu1[1] - cpu0[1]:.1f}; while catching up: {cpu2[0] - cpu1[0]:.1f}, {cpu2[1] - cpu1[1]:.1f}")
        print("result: " + ("OK, every task run Completed on the server" if ok else "FAILED: task runs crashed, "
                            "failed, not final or missing on the server"))
        return 0 if ok else 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # no timeout in the middle of the clean-up
        try:
            if handles is not None:
                handles.stop()
        finally:
            if pg is not None:
                pg.stop()
                shutil.rmtree(pg.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="task runs in the flow (default 500)")
    p.add_argument("--workers", type=int, default=8, help="ThreadPoolTaskRunner threads (default 8)")
    p.add_argument("--work-ms", type=float, default=5.0, help="numpy work per task in ms (default 5)")
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to wait after the flow for the server to record every task run "
                        "(default: 300, or 0.25 s per task run when more)")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run in s (default 900)")
    p.add_argument("--verbose", action="store_true", help="Prefect's per-task-run log lines on the console")
    args = p.parse_args(argv)
    if not 1 <= args.n <= 100_000 or not 1 <= args.workers <= 256 or not 0 <= args.work_ms <= 10_000:
        p.error("--n must be 1..100000, --workers 1..256, --work-ms 0..10000")
    if args.settle is None:
        args.settle = max(300.0, 0.25 * args.n)
    if args.timeout <= 0 or args.settle < 0:
        p.error("--timeout must be > 0 and --settle >= 0")

    def _alarm(_signum: int, _frame: object) -> None:
        raise BenchTimeout

    def _term(_signum: int, _frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _term)  # `kill` cleans up as Ctrl-C does
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    tmp = Path(tempfile.mkdtemp(prefix="surfdiff-prefect-load-"))
    try:
        return run(args, tmp)
    except BenchTimeout:
        print(f"timeout: the run took longer than --timeout {args.timeout:g} s", file=sys.stderr)
        return 124
    except SurfdiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Server and database are gone by now: skip Prefect's at-exit drain of unsent events and logs, which would
    # retry each one against the stopped server (minutes after a timeout with thousands of events queued).
    os._exit(code)
