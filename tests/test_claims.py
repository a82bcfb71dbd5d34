"""Issue 27: oracle work is claimed. Two `rss` processes on one study never compute the same structure twice and
together compute all; a claim whose owner died (dead pid on this host) or stopped heart-beating (expired) is taken
over. Claims work on the SQLite store and on MongoDB (mongomock here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from surfdiff_core.config import load_config
from surfdiff_core.rss import plan_tasks
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.store.claims import ClaimBoard, MongoClaims, SqliteClaims, WorkQueue, claim_board
from surfdiff_core.system_build import resolve_lattice, systems_for
from tests.conftest import TINY_CONFIG
from tests.test_lifetime import stored

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _as_owner(board: ClaimBoard, *, host: str | None = None, pid: int | None = None) -> ClaimBoard:
    """The same board seen as another owner (another process, or another host)."""
    board.host = host or board.host
    board.pid = pid or board.pid
    board.owner = f"{board.host}:{board.pid}:other"
    return board


@pytest.fixture(params=["sqlite", "mongo"])
def boards(request, tmp_path):
    """A factory of claim boards over one shared backend: each call is another owner."""
    if request.param == "sqlite":
        from surfdiff_core.config import StoreConfig
        from surfdiff_core.store import open_store

        store = open_store(StoreConfig(path=str(tmp_path / "store"))).connect()
        yield lambda ttl=60.0: SqliteClaims(store.store, ttl_s=ttl)
        store.close()
    else:
        import mongomock_ng

        coll = mongomock_ng.MongoClient().surfdiff.structures_claims
        yield lambda ttl=60.0: MongoClaims(coll, ttl_s=ttl)


def test_a_claim_is_held_until_released(boards):
    a, b = boards(), boards()
    assert a.claim("x") and a.claim("x")  # taking one's own claim again is fine
    assert not b.claim("x") and b.held_by_others(["x", "y"]) == {"x"}
    assert b.claim("y")
    a.release("x")
    assert b.claim("x") and not a.claim("x")
    b.release_all()
    assert a.claim("x") and a.claim("y")


def test_a_dead_owners_claim_is_taken_over(boards):
    dead = _as_owner(boards(), pid=_dead_pid())  # this host, a process that is gone: no need to wait
    assert dead.claim("x")
    live = boards()
    assert live.held_by_others(["x"]) == set()
    assert live.claim("x")


def test_a_zombie_owners_claim_is_taken_over(boards):
    """An owner that exited but is not reaped yet answers kill(0): it still holds nothing (as deploy/ sees it)."""
    from surfdiff_core.lifetime import pid_alive

    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    zombie = _as_owner(boards(), pid=child.pid)
    assert zombie.claim("x")
    assert boards().claim("x")  # taken over
    assert not pid_alive(child.pid) and child.poll() == 0  # reaped by the check: no zombie left behind
    assert pid_alive(os.getpid())


def test_an_expired_claim_is_taken_over_and_a_heartbeat_keeps_one(boards):
    far = _as_owner(boards(ttl=1.0), host="node-elsewhere", pid=1)  # another host: only expiry frees it
    assert far.claim("x") and far.claim("y")
    me = boards()
    assert not me.claim("x")
    time.sleep(0.6)
    far.renew()  # the heartbeat pushes both claims forward
    time.sleep(0.6)  # past the first expiry, not the renewed one
    assert not me.claim("x")
    time.sleep(1.1)
    assert me.claim("x") and me.claim("y")


def test_the_work_queue_hands_out_each_id_once_and_waits_for_others(boards):
    a, b = boards(), boards()
    stored: set[str] = set()
    qa = WorkQueue(a, ["1", "2", "3"], needed=lambda i: i not in stored, poll_s=0.05)
    heard: list[str] = []
    qb = WorkQueue(b, ["1", "2", "3"], needed=lambda i: i not in stored, poll_s=0.05, on_elsewhere=heard.append)
    with qa, qb:
        assert qa.take() == "1" and qb.take() == "2"
        assert qa.take() == "3" and qb.take() is None and qb.waiting()
        for i in ("1", "2", "3"):
            stored.add(i)
            (qb if i == "2" else qa).done(i)
        time.sleep(0.06)
        assert qb.take() is None and not qb.waiting() and qb.elsewhere == 2
        assert sorted(heard) == ["1", "3"]  # what a progress bar counts as done by others
    assert not a.held_by_others(["1", "2", "3"])


# ---- two processes, one study ---------------------------------------------------------------------------------
RSS = "rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 20, fmax: 0.02, steps: 150, seed: 0}"


def _config(tmp_path: Path) -> Path:
    text = TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store")).replace(
        "rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 8, fmax: 0.2, steps: 40, seed: 0}", RSS)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def _relaxed(text: str) -> tuple[int, int]:
    m = re.search(r"RSS: (\d+) relaxed, \d+ already in the store(?:, (\d+) computed meanwhile)?", text)
    assert m, text
    return int(m.group(1)), int(m.group(2) or 0)


@pytest.mark.slow
def test_two_rss_processes_split_the_work(tmp_path, capsys):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "a.out"
    with open(out, "wb") as fh:
        other = subprocess.Popen([sys.executable, "-m", "flows.cli", "rss", str(cfg), "--run-id", "a"], cwd=ROOT,
                                 env=env, stdout=fh, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not stored(tmp_path / "data" / "store", "rss"):
            assert other.poll() is None and time.monotonic() < deadline, "the other rss ended before its first"
            time.sleep(0.05)
        assert main(["rss", str(cfg), "--run-id", "b"]) == 0  # this one joins while the other is at work
    finally:
        assert other.wait(timeout=300) == 0
    done_b, _ = _relaxed(capsys.readouterr().out)
    done_a, _ = _relaxed(out.read_text())
    assert done_a + done_b == 20 and done_a > 0 and done_b > 0  # all computed, none twice, both at work
    with open_study_store(load_config(cfg)) as store:
        runs = [d["run_id"] for d in store.find_raw({"source": "rss"}, properties=["doc_id", "run_id"])]
    assert len(runs) == 20 and runs.count("a") == done_a and runs.count("b") == done_b
    assert main(["rss", str(cfg)]) == 0 and _relaxed(capsys.readouterr().out) == (0, 0)  # nothing left


def _claim_all(cfg_path: Path, board_for) -> list[str]:
    cfg = load_config(cfg_path)
    systems = systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, resolve_lattice(cfg))
    ids = [t.doc_id for t in plan_tasks(cfg, systems, cfg.rss.n, cfg.rss.seed)]
    with open_study_store(cfg) as store:
        board = board_for(claim_board(store))
        assert all(board.claim(i) for i in ids)
    return ids


def test_claims_of_a_dead_rss_are_taken_over_at_once(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store")))
    _claim_all(cfg, lambda b: _as_owner(b, pid=_dead_pid()))  # an rss killed with SIGKILL on this host
    start = time.monotonic()
    assert main(["rss", str(cfg)]) == 0
    assert _relaxed(capsys.readouterr().out) == (8, 0) and time.monotonic() - start < 60


def test_claims_of_a_silent_host_are_taken_over_when_they_expire(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store")).replace("n: 8,", "n: 2,"))

    def far(board: ClaimBoard) -> ClaimBoard:
        board.ttl_s = 1.0
        return _as_owner(board, host="node-elsewhere", pid=1)

    _claim_all(cfg, far)
    start = time.monotonic()
    assert main(["rss", str(cfg)]) == 0
    assert _relaxed(capsys.readouterr().out) == (2, 0)
    assert time.monotonic() - start >= 0.9  # it waited for the claims to lapse, then did the work


def _generated_candidates(tmp_path: Path, n: int = 3):
    """A small sqlite-backed study and `n` generated candidates of its training system."""
    import numpy as np

    from surfdiff_core.config import config_from_dict
    from surfdiff_core.stages.common import training_system
    from surfdiff_core.store import StructureDoc
    from surfdiff_core.store.documents import atoms_to_structure_dict

    cfg = config_from_dict({
        "name": "claims", "substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1, "vacuum": 7},
        "confinement": {"z_min": 0.5, "z_max": 4.0},
        "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"], "n": 1, "steps": 20, "fmax": 0.2},
        "relax": {"method": "emt", "steps": 20, "fmax": 0.2},
        "store": {"backend": "sqlite", "path": str(tmp_path / "store")},
    })
    system = training_system(cfg)
    rng = np.random.default_rng(3)
    parents = []
    for i in range(n):
        atoms = system.random_structure(rng)
        parents.append(StructureDoc(
            doc_id=f"generated-{i}", source="generated", study=cfg.name, energy_model="mlff:m",
            structure=atoms_to_structure_dict(atoms), composition=system.composition,
            formula=atoms.get_chemical_formula(), system_id=system.system_id, element=system.element,
            facet=system.facet, cell=system.cell, n_substrate=system.n_substrate, movable=system.movable.tolist(),
            fixed=system.fixed_indices.tolist(), z_box=list(system.z_box), energy=-1.0 - i, model_id="m"))
    return cfg, system, parents


def _finish_as_other(store, other: ClaimBoard, held: str, doc, started: dict):
    """A thread that, once this process has stored something matching `started`, stores `doc` as the other
    owner's work and lets its claim go."""
    import threading

    def other_finishes() -> None:
        deadline = time.monotonic() + 120
        while not store.count(started) and time.monotonic() < deadline:
            time.sleep(0.05)
        store.put(doc)
        other.release(held)

    return threading.Thread(target=other_finishes)


def test_a_relax_stage_leaves_a_candidate_another_process_claimed(tmp_path):
    """Two relax stages on one store: the candidate the other one holds is relaxed by it alone, and this
    stage waits for its document instead of relaxing it again."""
    from surfdiff_core.stages import relax as relax_stage

    cfg, _, parents = _generated_candidates(tmp_path)
    held = relax_stage.relaxed_doc_id(parents[0], cfg.relax)
    other_process = subprocess.Popen(["sleep", "60"])
    try:
        with open_study_store(cfg) as store:
            other = _as_owner(claim_board(store), pid=other_process.pid)  # alive, on this host
            assert other.claim(held)
            finisher = _finish_as_other(store, other, held, parents[0].model_copy(update={
                "doc_id": held, "source": "relaxed", "run_id": "other", "parent_id": parents[0].doc_id,
                "energy": -9.0}), {"run_id": "mine"})
            finisher.start()
            summary = relax_stage.run(cfg, store, candidates=parents, run_id="mine")
            finisher.join()
            assert (summary.relaxed, summary.by_others, summary.skipped, summary.failed) == (2, 1, 0, 0)
            docs = {d.parent_id: d for d in store.find({"source": "relaxed"})}
            assert docs["generated-0"].run_id == "other" and docs["generated-0"].energy == -9.0  # not redone
            assert {docs[f"generated-{i}"].run_id for i in (1, 2)} == {"mine"}
    finally:
        other_process.kill()
        other_process.wait()


@pytest.mark.parametrize("source", ["relaxed", "single_point"])
def test_oracle_labels_leave_a_candidate_another_process_claimed(tmp_path, monkeypatch, source):
    """Two evaluations (or active-learning rounds) on one store: a label another live process holds is not
    computed again here; this one waits for its document and returns it with its own."""
    from ase.calculators.emt import EMT

    from surfdiff_core.stages import oracle_relax
    from surfdiff_core.stages.oracle_relax import label_id, relax_samples, single_points

    computed: list[str] = []
    label_one = oracle_relax.label_one
    monkeypatch.setattr(oracle_relax, "label_one", lambda *a, **k: computed.append(a[4]) or label_one(*a, **k))
    bars = []

    class Bar:  # the progress bar's count: the labels this process made and those the other one finished
        def __init__(self, total: int, **_) -> None:
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_) -> None:
            pass

    monkeypatch.setattr(oracle_relax, "progress_bar", Bar)
    cfg, system, parents = _generated_candidates(tmp_path)
    label = relax_samples if source == "relaxed" else single_points
    held = label_id(cfg, parents[1], source, "eval")
    other_process = subprocess.Popen(["sleep", "60"])
    try:
        with open_study_store(cfg) as store:
            other = _as_owner(claim_board(store), pid=other_process.pid)
            assert other.claim(held)
            theirs = parents[1].model_copy(update={"doc_id": held, "source": source, "parent_id": "generated-1",
                                                   "energy": -9.0, "meta": {"purpose": "theirs"}})
            finisher = _finish_as_other(store, other, held, theirs, {"source": source})
            finisher.start()
            docs = label(cfg, store, system, parents, EMT(), tag="eval", progress=False)
            finisher.join()
            assert held not in computed and len(computed) == 2
            assert [d.parent_id for d in docs] == [p.doc_id for p in parents]
            assert docs[1].doc_id == held and docs[1].energy == -9.0 and docs[1].meta["purpose"] == "theirs"
            assert all(d.meta["purpose"] == "eval" and d.energy != -9.0 for d in (docs[0], docs[2]))
            assert store.count({"source": source}) == 3
            assert [(b.n, b.total) for b in bars] == [(3, 3)]
    finally:
        other_process.kill()
        other_process.wait()
