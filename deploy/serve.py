"""`surfdiff serve`: a local Prefect server, the `process` work pool, the project's deployments and a worker.

One command for the whole local orchestration stack:

1. `prefect server start` on 127.0.0.1 with SQLite under a project data dir (PREFECT_HOME, default
   data/prefect/ of the checkout, so ~/.prefect is left alone unless --prefect-home points there);
2. the `process` work pool (default `surfdiff-local`) if it is missing;
3. one deployment per flow from deploy/prefect.yaml (`prefect deploy --all` from the repository root);
4. `prefect worker start` for the pool (unless --no-worker);
5. the UI URL, then it waits until Ctrl-C and stops worker, flow runs and server.

The API asks for a password (Prefect's basic auth): `SURFDIFF_PREFECT_AUTH`, else a secret generated on first
start into PREFECT_HOME/api-auth (mode 0600). Server, deploy step, worker and flow runs get it through their
environment; it is never printed or logged.

Every Prefect process runs in its own process group and their descendants are tracked, so `stop()` leaves
nothing behind, even on failure. A hard kill of `serve` leaves nothing either: the children get a parent-death
signal, a small guard process kills whatever is left (flow runs included), and the next `serve` of the same
Prefect home cleans up after an earlier one it finds in PREFECT_HOME/serve.pids.
Tests use `start_serve()` / `ServeHandles.stop()` directly.
Process handling (ports, process trees, pid file, guard) is in deploy/processes.py, the API password in
deploy/auth.py.
Analytics are off and no Prefect Cloud settings reach the children; secrets stay in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.auth import AUTH_ENV, AUTH_FILE, resolve_auth
from deploy.processes import HOST, PIDS_FILE, Child, clean_stale, port_free, spawn, spawn_guard, write_pids
from surfdiff_core.errors import ConfigError, SurfdiffError

DEFAULT_PORT = 4200
DEFAULT_POOL = "surfdiff-local"
PREFECT_FILE = Path("deploy") / "prefect.yaml"
# Settings that could point the children at another server, profile or Prefect Cloud account.
_FOREIGN_SETTINGS = (
    "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
    "PREFECT_UI_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_CLOUD_API_URL",
)


class ServeError(SurfdiffError):
    """A part of the local Prefect stack failed to start (the message names the log to read)."""


def project_root() -> Path:
    """The checkout that holds deploy/prefect.yaml: the one these flows are imported from, else the cwd."""
    for cand in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (cand / PREFECT_FILE).is_file():
            return cand
    raise ConfigError(f"no {PREFECT_FILE} found: run `surfdiff serve` from the surfdiff repository root")


def prefect_env(home: Path, port: int, *, poll_seconds: float = 5.0, base: dict[str, str] | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Prefect child: this server only, data under `home`, no telemetry."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_SETTINGS}
    url = f"http://{HOST}:{port}"
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_URL": url,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # also switches off the UI's analytics
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_WORKER_WEBSERVER_HOST": HOST,
        "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
        "PREFECT_WORKER_PREFETCH_SECONDS": str(max(poll_seconds, 2.0)),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def _prefect_cmd(*args: str) -> list[str]:
    # The interpreter running surfdiff, so server, deploy and worker use this same environment.
    return [sys.executable, "-m", "prefect", *args]


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class ServeHandles:
    """The running stack; `stop()` (or leaving the `with` block) tears all of it down."""

    url: str
    api_url: str
    home: Path
    pool: str
    root: Path
    env: dict[str, str] = field(repr=False)  # holds the caller's secrets (e.g. SURFDIFF_MONGO_URI): never print it
    auth: str = field(repr=False, default="")  # the API password ('user:password')
    deployments: list[str] = field(default_factory=list)
    server: Child | None = None
    worker: Child | None = None
    guard: subprocess.Popen | None = field(default=None, repr=False)

    def client(self) -> Any:
        """A SyncPrefectClient of this server, logged in."""
        return _client(self.api_url, self.auth)

    def record_pids(self) -> None:
        """serve.pids: this process, its guard and children, for the guard and for a later serve."""
        entries = {"serve": os.getpid()}
        if self.guard is not None:
            entries["guard"] = self.guard.pid
        entries |= {c.name: c.proc.pid for c in (self.server, self.worker) if c is not None}
        write_pids(self.home, entries)

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [c.proc for c in (self.worker, self.server) if c is not None]

    def failed(self) -> str | None:
        """Name and log tail of a child that exited on its own, else None."""
        for c in (self.server, self.worker):
            if c is not None and c.proc.poll() is not None:
                return f"{c.name} exited with code {c.proc.returncode}; {c.log}:\n{_tail(c.log)}"
        return None

    def stop(self, timeout: float = 20.0) -> None:
        # Worker (and its flow runs) first, so nothing reports to a server that is already gone.
        for attr in ("worker", "server"):
            child = getattr(self, attr)
            if child is not None:
                child.stop(timeout)
                setattr(self, attr, None)
        # Children gone: no list for the guard to act on, so it exits quietly.
        (self.home / PIDS_FILE).unlink(missing_ok=True)
        if self.guard is not None:
            with contextlib.suppress(ProcessLookupError):
                self.guard.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.guard.wait(timeout=10)
            self.guard = None

    def __enter__(self) -> ServeHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_healthy(handles: ServeHandles, timeout: float = 180.0) -> None:
    """Poll /api/health until the server answers; fail early with its log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if msg := handles.failed():
            raise ServeError(f"the Prefect server did not start: {msg}")
        try:
            with urllib.request.urlopen(f"{handles.api_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServeError(f"the Prefect server gave no answer on {handles.api_url}/health within {timeout:.0f} s; "
                     f"see {handles.server.log if handles.server else handles.home}")


def _client(api_url: str, auth: str | None = None):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url, auth_string=auth or None)


def ensure_pool(api_url: str, name: str, auth: str | None = None) -> bool:
    """Create the `process` work pool `name` unless it exists; True if it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client(api_url, auth) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", description="surfdiff: flow runs as local processes",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
    if pool.type != "process":
        raise ConfigError(f"work pool {name!r} exists with type {pool.type!r}; surfdiff serve needs a "
                          "'process' pool: pass another --pool name")
    return False


def study_parameters(parameters: dict[str, Any] | None, root: Path, where: str) -> dict[str, Any]:
    """A deployment's `config_path: configs/X.yaml` as the typed study it names, so the UI's run form shows
    (and prefills) every field; `config_path` itself stays a parameter that, when given, wins."""
    from surfdiff_core.config import load_config

    params = dict(parameters or {})
    path = params.pop("config_path", None)
    if path is None or "study" in params:
        return parameters or {}
    try:
        params["study"] = load_config(root / path).model_dump(mode="json")
    except SurfdiffError as exc:
        raise ServeError(f"{where}: {exc}") from None
    return params


def deploy(handles: ServeHandles, prefect_file: Path | None = None, timeout: float = 600.0) -> list[str]:
    """`prefect deploy --all` from the repository root, on a copy of deploy/prefect.yaml with the pool name of
    `handles` substituted and each default config file expanded into the typed study."""
    src = prefect_file or handles.root / PREFECT_FILE
    spec = yaml.safe_load(src.read_text())
    for d in spec.get("deployments", []):
        d.setdefault("work_pool", {})["name"] = handles.pool
        d["parameters"] = study_parameters(d.get("parameters"), handles.root, f"{src}: deployment {d['name']}")
    effective = handles.home / "prefect.yaml"  # a copy: --pool must not rewrite the tracked file
    effective.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = handles.home / "logs" / "deploy.log"
    with log.open("wb") as fh:
        try:
            rc = subprocess.run(_prefect_cmd("--no-prompt", "deploy", "--all", "--prefect-file", str(effective)),
                                cwd=handles.root, env=handles.env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            raise ServeError(f"`prefect deploy` took longer than {timeout:.0f} s; see {log}") from None
    names = list_deployments(handles.api_url, handles.auth)
    wanted = {f"{_flow_name(handles.root, d['entrypoint'])}/{d['name']}" for d in spec.get("deployments", [])}
    if rc != 0 or not wanted <= set(names):
        raise ServeError(f"`prefect deploy` failed (exit {rc}; missing {sorted(wanted - set(names))}); "
                         f"{log}:\n{_tail(log)}")
    return names


def _flow_name(root: Path, entrypoint: str) -> str:
    """The @flow(name=...) of an entrypoint, read from the source (cheap: no import of torch & co)."""
    import ast

    path, func = entrypoint.split(":")
    tree = ast.parse((root / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return str(kw.value.value)
    return func.replace("_", "-")


def list_deployments(api_url: str, auth: str | None = None) -> list[str]:
    """'flow/deployment' names registered on the server."""
    with _client(api_url, auth) as client:
        deps = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deps)


def resolve_home(prefect_home: str | Path | None, root: Path | None = None) -> Path:
    """--prefect-home, else data/prefect of the checkout (never ~/.prefect unless asked for)."""
    if prefect_home:
        return Path(prefect_home).expanduser().resolve()
    return (root or project_root()) / "data" / "prefect"


def start_serve(*, port: int = DEFAULT_PORT, pool: str = DEFAULT_POOL, prefect_home: str | Path | None = None,
                worker: bool = True, register: bool = True, poll_seconds: float = 5.0,
                extra_env: dict[str, str] | None = None, health_timeout: float = 180.0,
                log: Any = print) -> ServeHandles:
    """Start server (+ pool, deployments, worker) and return the handles; everything is stopped on failure."""
    root = project_root()
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535 (got {port})")
    if not pool.strip():
        raise ConfigError("--pool must not be empty")
    home = resolve_home(prefect_home, root)
    clean_stale(home, log)  # an earlier serve killed hard may still hold the port
    if not port_free(port):
        raise ConfigError(f"port {port} on {HOST} is in use (another Prefect server?): pass --port")
    (home / "logs").mkdir(parents=True, exist_ok=True)
    auth = resolve_auth(home)
    # Clients (deploy step, worker, flow runs) log in with the password; only the server checks it.
    env = prefect_env(home, port, poll_seconds=poll_seconds, extra={**(extra_env or {}),
                                                                    "PREFECT_API_AUTH_STRING": auth})
    url = f"http://{HOST}:{port}"
    h = ServeHandles(url=url, api_url=f"{url}/api", home=home, pool=pool, root=root, env=env, auth=auth)
    try:
        h.guard = spawn_guard(home, root, home / "logs")
        h.record_pids()
        log(f"starting the Prefect server on {url} (PREFECT_HOME={home}) ...")
        h.server = spawn("server", _prefect_cmd("server", "start", "--host", HOST, "--port", str(port),
                                                  "--analytics-off"),
                          {**env, "PREFECT_SERVER_API_AUTH_STRING": auth}, root, home / "logs")
        h.record_pids()
        wait_healthy(h, health_timeout)
        if ensure_pool(h.api_url, pool, auth):
            log(f"created the process work pool {pool!r}")
        if register:
            log(f"registering the deployments of {PREFECT_FILE} ...")
            h.deployments = deploy(h)
            log("deployments: " + ", ".join(h.deployments))
        if worker:
            h.worker = spawn("worker", _prefect_cmd("worker", "start", "--pool", pool, "--type", "process"),
                              env, root, home / "logs")
            h.record_pids()
            time.sleep(1.0)
            if msg := h.failed():
                raise ServeError(msg)
    except BaseException:
        h.stop()
        raise
    return h


# ---- command ----------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    def _on_term(_signum: int, _frame: object) -> None:  # `kill PID` stops as cleanly as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    handles: ServeHandles | None = None
    # This process talks to the server too (pool, deployments): same settings as the children, so importing
    # Prefect here reads and writes nothing under ~/.prefect.
    env = prefect_env(resolve_home(args.prefect_home), args.port)
    for key in _FOREIGN_SETTINGS:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        handles = start_serve(port=args.port, pool=args.pool, prefect_home=args.prefect_home,
                              worker=not args.no_worker)
        if args.check:
            print(f"ok: server {handles.url}, pool {handles.pool}, {len(handles.deployments)} deployments, "
                  f"worker {'running' if handles.worker else 'off'}")
            return 0
        print(f"\nPrefect UI: {handles.url}   (API {handles.api_url}; logs in {handles.home / 'logs'})")
        secret_from = f"${AUTH_ENV}" if os.environ.get(AUTH_ENV, "").strip() else handles.home / AUTH_FILE
        print(f"login: the UI and the API ask for the password in {secret_from} (the whole line, user:password)")
        print(f"worker: {'running on pool ' + handles.pool if handles.worker else 'off (--no-worker)'}")
        print("run a deployment from the UI, or e.g.:")
        auth_cmd = (f'"${AUTH_ENV}"' if isinstance(secret_from, str) else f'"$(cat {secret_from})"')
        print(f"  PREFECT_API_URL={handles.api_url} PREFECT_API_AUTH_STRING={auth_cmd} "
              "prefect deployment run rss/demo -p n=10")
        print("Ctrl-C stops worker and server.", flush=True)
        while not (msg := handles.failed()):
            time.sleep(1.0)
        raise ServeError(msg)
    except KeyboardInterrupt:
        return 0
    finally:
        if handles is not None:
            print("stopping worker and server ...", file=sys.stderr, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                handles.stop()
        signal.signal(signal.SIGTERM, previous)


def add_serve_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="local Prefect server + process work pool + deployments + worker (UI)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port on {HOST} (default {DEFAULT_PORT})")
    p.add_argument("--pool", default=DEFAULT_POOL, help=f"process work pool name (default {DEFAULT_POOL})")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker (e.g. it runs on a cluster)")
    p.add_argument("--prefect-home", default=None,
                   help="PREFECT_HOME with the SQLite database and logs (default: data/prefect of the checkout)")
    p.add_argument("--check", action="store_true",
                   help="start everything, report, stop again (exit 0 when the stack works)")
    p.set_defaults(func=cmd_serve)
