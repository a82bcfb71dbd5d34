"""Issue 27: no process outlives the command that started it, whatever signal ends it; SIGTERM stops like Ctrl-C
(finished work saved, one line, exit 143); a rerun completes with no duplicate documents, and a resumed `sample`
says what it reused.

Each command runs in its own Unix session (start_new_session), so every process it starts, however deep, is
found by the session id in /proc/*/stat; the test kills it once it has started its work."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process in Unix session `sid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(entry)] = cmd[:120]
    return found


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {_stderr(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


_STDERR: dict[int, Path] = {}  # pid -> file of its stderr


def _stderr(proc: subprocess.Popen) -> str:
    return _STDERR[proc.pid].read_text()


def start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """`surfdiff ARGS` in a new session; stdout and stderr go to files (a pipe held by a leftover would hang)."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(tmp_path / "stdout", "ab") as out, open(err, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=errf, start_new_session=True)
    _STDERR[proc.pid] = err
    return proc


def stop_and_check(proc: subprocess.Popen, sig: int, timeout: float = 30.0) -> str:
    """Send `sig`; the command ends (143 for SIGTERM, with one line), and within a few seconds nothing of its
    session is left. Returns its stderr. Leftovers are killed (by pid) so that a failure leaves none behind."""
    sid = proc.pid  # a session leader's pid is the session id
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {timeout} s after {signal.Signals(sig).name}")
    deadline = time.monotonic() + 10
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"left behind after {signal.Signals(sig).name}: {left}"
    err = _stderr(proc)
    if sig == signal.SIGTERM:
        assert rc == 143, err
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert last.endswith("terminated (SIGTERM); finished work is saved, rerun to resume"), repr(err[-2000:])
        assert "Traceback" not in err
    else:
        assert rc == -sig
    return err


def stored(store: Path, source: str) -> list[str]:
    """doc ids of `source` in the SQLite store, read-only (the command may still be writing)."""
    db = store / "surfdiff.sqlite3"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT json_extract(doc, '$.doc_id') FROM structures "
                                "WHERE json_extract(doc, '$.source') = ?", (source,)).fetchall()
    except sqlite3.OperationalError:  # created but no table yet
        return []
    return [r[0] for r in rows]


def _config(tmp_path: Path, rss: str | None = None) -> Path:
    text = TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store"))
    if rss:
        text = text.replace("rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 8, fmax: 0.2, steps: 40, seed: 0}",
                            rss)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


# a search that lasts a few seconds on two workers: killed while it runs
SLOW_RSS = "rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 16, fmax: 0.02, steps: 150, seed: 0}"


@pytest.mark.slow  # spawn workers import torch: seconds before the first structure on shared cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_rss_worker_pool_dies_with_the_command(tmp_path, sig):
    cfg = _config(tmp_path, SLOW_RSS)
    store = tmp_path / "data" / "store"
    proc = start(["rss", str(cfg), "--workers", "2"], tmp_path)
    # the pool is up (command, resource tracker, two spawn workers) and the first structure is stored
    _wait_for(lambda: len(session_processes(proc.pid)) >= 4 and stored(store, "rss"), proc, "worker pool at work")
    stop_and_check(proc, sig)
    assert main(["rss", str(cfg), "--workers", "1"]) == 0  # the rerun completes the rest
    ids = stored(store, "rss")
    assert len(ids) == 16 and len(set(ids)) == 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny study with its RSS data and a trained model (shared: each test samples with its own seed)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = _config(tmp)
    assert main(["rss", str(cfg)]) == 0
    assert main(["train", str(cfg), "--epochs", "1"]) == 0
    return cfg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_sample_killed_resumes_and_says_what_it_reused(trained, tmp_path, capsys, sig):
    seed = str(10 + int(sig))
    args = ["sample", str(trained), "--n", "32", "--batch-size", "4", "--steps", "20", "--seed", seed]
    store = trained.parent / "data" / "store"
    before = set(stored(store, "generated"))
    proc = start(args, tmp_path)
    _wait_for(lambda: len(set(stored(store, "generated")) - before) >= 4, proc, "first batch stored")
    stop_and_check(proc, sig)
    kept = len(set(stored(store, "generated")) - before)
    assert 4 <= kept < 32 and kept % 4 == 0  # whole batches: the killed one is not half-written
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{kept // 4} of 8 batches already in the store (run " in out
    new_run = out.strip().splitlines()[-1].rsplit("run ", 1)[1]
    assert main(args) == 0  # nothing left to do: the run named is the one the documents carry
    out = capsys.readouterr().out
    assert "8 of 8 batches already in the store" in out and "nothing new to generate" in out
    carried = out.strip().splitlines()[-1].rsplit("run ", 1)[1]
    assert new_run in carried.split(", ")
    ids = stored(store, "generated")
    assert len(ids) == len(set(ids)) == len(before) + 32


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_train_killed_resumes_from_its_checkpoint(tmp_path, capsys, sig):
    cfg = _config(tmp_path)
    assert main(["rss", str(cfg)]) == 0
    proc = start(["train", str(cfg), "--epochs", "500"], tmp_path)
    ckdir = tmp_path / "data" / "checkpoints"
    _wait_for(lambda: any(ckdir.glob("*-last.pt")), proc, "first epoch's checkpoint")
    stop_and_check(proc, sig)
    capsys.readouterr()
    assert main(["train", str(cfg), "--epochs", "2"]) == 0
    assert "resumed from its checkpoint at epoch" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_run_leaves_no_prefect_server_behind(tmp_path, sig):
    cfg = _config(tmp_path, SLOW_RSS)
    store = tmp_path / "data" / "store"
    proc = start(["run", str(cfg)], tmp_path)
    # the temporary Prefect server is up and the flow is in its RSS stage
    _wait_for(lambda: any("uvicorn" in c for c in session_processes(proc.pid).values()) and stored(store, "rss"),
              proc, "the flow's RSS stage", timeout=180)
    stop_and_check(proc, sig)
    assert main(["rss", str(cfg)]) == 0  # what the flow stored is kept; the rest is done once
    ids = stored(store, "rss")
    assert len(ids) == len(set(ids)) == 16
