"""Prefect's temporary (ephemeral) API server, started so that it dies with the command that uses it.

Without PREFECT_API_URL, Prefect starts a uvicorn subprocess on first use and stops it at exit (atexit). A
command killed by a signal runs no atexit, so the server would be left behind holding its port. Started here
instead, from the main thread and before any flow runs, the same server gets a parent-death signal (SIGTERM:
uvicorn shuts down cleanly); Prefect's own calls find this instance and reuse it.
"""

from __future__ import annotations

import subprocess
from typing import Any

from surfdiff_core.lifetime import pdeathsig_preexec


class _PopenDyingWithParent:
    """The `subprocess` module as Prefect's server module sees it while it starts uvicorn: Popen with the
    parent-death signal; everything else is the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - stands in for subprocess.Popen
        preexec = pdeathsig_preexec()
        if preexec is not None and kwargs.get("preexec_fn") is None:
            kwargs["preexec_fn"] = preexec
        return subprocess.Popen(*args, **kwargs)


def start_ephemeral_server() -> str | None:
    """Start Prefect's temporary server now, tied to this process; its API URL, or None where a server is
    configured (PREFECT_API_URL) and nothing is started."""
    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None

    class _TiedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            real = server_module.subprocess
            server_module.subprocess = _PopenDyingWithParent()  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    # SubprocessASGIServer keeps one instance per port (None: "any free port"); creating ours first makes
    # every later SubprocessASGIServer() in Prefect return it.
    server = _TiedServer()
    server.start()
    return server.api_url
