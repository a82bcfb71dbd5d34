"""SQLite store at study scale: criteria translation against Mongo's rules, concurrent and killed writers,
jobflow's JobStore on top of it."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sqlite3
import time
from datetime import datetime

import mongomock_ng as mongomock
import pytest

from surfdiff_core.store.sqlite_store import SqliteStore

# mongomock compares True/False equal to 1/0 where MongoDB keeps them apart (type brackets, as the SQLite store
# does: see test_booleans_are_not_numbers), so booleans only sit in 'b', which holds no 0 or 1.
SCALARS = {
    "a": [None, 0, 1, 2, 2.5, -1, "a", "b", "ab", "", "1"],
    "b": [None, True, False, 2, -1, "a", "b", "1"],
    "c": [None, 0, 1, 2, 2.5, -1, "a", "ab", ""],
}
SCALARS["n.x"] = SCALARS["c"]
SCALARS["n.y"] = [1, 2, "z"]
SCALARS["missing"] = SCALARS["a"]
ARRAYS = [[1, 2], ["a"], [], {"x": 1}]


def _random_doc(rng: random.Random, i: int) -> dict:
    doc: dict = {"doc_id": f"d{i}"}
    for field in ("a", "b", "c"):
        if rng.random() < 0.85:
            pool = SCALARS[field] + (ARRAYS if field != "c" else [])  # 'c' never holds arrays
            doc[field] = rng.choice(pool)
    if rng.random() < 0.7:
        doc["n"] = {"x": rng.choice(SCALARS["n.x"]), "y": rng.choice(SCALARS["n.y"])}
    return doc


def _random_condition(rng: random.Random, depth: int = 0) -> dict:
    if depth < 2 and rng.random() < 0.25:
        op = rng.choice(["$and", "$or", "$nor"])
        return {op: [_random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    field = rng.choice(list(SCALARS))
    scalars = SCALARS[field]
    kind = rng.choice(["eq", "$ne", "$in", "$nin", "$lt", "$lte", "$gt", "$gte", "$exists", "range"])
    if kind == "eq":
        return {field: rng.choice(scalars)}
    if kind in ("$in", "$nin"):
        return {field: {kind: rng.sample(scalars, rng.randint(0, 3))}}
    if kind == "$exists":
        return {field: {"$exists": rng.random() < 0.5}}
    if kind == "range":
        return {field: {"$gte": rng.choice([0, 1, "a"]), "$lt": rng.choice([2, 3, "b"])}}
    return {field: {kind: rng.choice(scalars)}}


def test_booleans_are_not_numbers(tmp_path):
    store = SqliteStore(str(tmp_path / "s.sqlite3"), "coll", key="doc_id")
    store.connect()
    store.update([{"doc_id": "zero", "v": 0}, {"doc_id": "false", "v": False}, {"doc_id": "one", "v": 1.0}])
    assert [d["doc_id"] for d in store.query({"v": False})] == ["false"]
    assert sorted(d["doc_id"] for d in store.query({"v": {"$in": [0, 1]}})) == ["one", "zero"]
    assert sorted(d["doc_id"] for d in store.query({"v": {"$ne": True}})) == ["false", "one", "zero"]
    store.update({"doc_id": "zero", "v": 0, "last_updated": datetime(2024, 5, 1, 12, 0)})
    assert store.last_updated == datetime(2024, 5, 1, 12, 0)  # datetimes are stored as ISO strings
    store.close()


def test_upserts_match_keys_exactly_within_and_across_batches(tmp_path):
    """One indexed lookup per batch finds the rows to replace: a key written twice in one batch keeps the last
    copy, string keys never match numbers, and non-string keys still upsert."""
    store = SqliteStore(str(tmp_path / "s.sqlite3"), "coll", key="doc_id")
    store.connect()
    store.update([{"doc_id": "a", "v": 1}, {"doc_id": "1", "v": 2}, {"doc_id": 1, "v": 3}])
    store.update([{"doc_id": "a", "v": 10}, {"doc_id": "new", "v": 4}, {"doc_id": "new", "v": 5},
                  {"doc_id": 1, "v": 30}, {"doc_id": "a", "v": 11}])
    rows = sorted((repr(d["doc_id"]), d["v"]) for d in store.query({}, properties=["doc_id", "v"]))
    assert rows == [("'1'", 2), ("'a'", 11), ("'new'", 5), ("1", 30)]
    store.update([{"doc_id": f"k{i}", "v": i} for i in range(1200)])  # more keys than one lookup takes
    store.update([{"doc_id": f"k{i}", "v": -i} for i in range(1200)])
    assert store.count({}) == 1204 and store.count({"v": {"$lt": -1000}}) == 199
    store.close()


@pytest.mark.parametrize("seed", range(3))
def test_criteria_match_mongo_rules(tmp_path, seed):
    """Random documents and criteria: SQLite answers exactly what mongomock (Mongo's rules) answers."""
    rng = random.Random(seed)
    docs = [_random_doc(rng, i) for i in range(120)]
    mock = mongomock.MongoClient().db.coll
    mock.insert_many([dict(d) for d in docs])
    store = SqliteStore(str(tmp_path / "s.sqlite3"), "coll", key="doc_id")
    store.connect()
    store.update(docs)
    for name in ("a", "b", "c", "n.x"):
        store.ensure_index(name)
    for _ in range(150):
        crit = _random_condition(rng)
        expected = sorted(d["doc_id"] for d in mock.find(crit))
        got = sorted(d["doc_id"] for d in store.query(crit, properties=["doc_id"]))
        assert got == expected, crit
        assert store.count(crit) == len(expected), crit
    assert sorted(store.distinct("c"), key=repr) == sorted(mock.distinct("c"), key=repr)
    assert sorted(map(repr, store.distinct("a"))) == sorted(map(repr, mock.distinct("a")))
    top = [d["doc_id"] for d in store.query({"c": {"$gte": 0}}, sort={"c": -1, "doc_id": 1}, skip=1, limit=5)]
    want = [d["doc_id"] for d in mock.find({"c": {"$gte": 0}}).sort([("c", -1), ("doc_id", 1)]).skip(1).limit(5)]
    assert top == want
    store.remove_docs({"a": {"$in": [1, "a"]}})
    assert store.count() == mock.count_documents({}) - mock.count_documents({"a": {"$in": [1, "a"]}})
    store.close()


def _writer(path: str, ids: list[int], barrier) -> None:
    store = SqliteStore(path, "structures", key="doc_id", timeout=60)
    barrier.wait()  # both processes open a fresh store at the same moment
    store.connect()
    for start in range(0, len(ids), 50):
        store.update([{"doc_id": f"d{i}", "pid": os.getpid(), "x": "y" * 2000} for i in ids[start:start + 50]])
    store.close()


@pytest.mark.slow
def test_two_processes_write_one_fresh_store(tmp_path):
    path = str(tmp_path / "fresh" / "s.sqlite3")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, list(r), barrier)) for r in (range(0, 600), range(400, 1000))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = SqliteStore(path, "structures", key="doc_id")
    store.connect()
    assert store.count() == 1000  # nothing lost
    assert len(store.distinct("doc_id")) == 1000  # nothing duplicated (ids 400..599 written twice)
    store.close()


def _batch(first: int, n: int) -> list[dict]:
    return [{"doc_id": f"k{i}", "payload": [float(i)] * 1500} for i in range(first, first + n)]


def _killable_writer(path: str, ready) -> None:
    store = SqliteStore(path, "structures", key="doc_id")
    store.connect()
    store.update(_batch(0, 200))
    ready.set()
    while True:  # keep writing big batches until killed
        store.update(_batch(200, 2000))


@pytest.mark.slow
def test_writer_killed_mid_batch(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_killable_writer, args=(path, ready))
    proc.start()
    assert ready.wait(60)
    time.sleep(0.4)  # well inside the 2,000-document transaction
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = SqliteStore(path, "structures", key="doc_id")
    store.connect()
    assert store.count() in (200, 2200)  # each batch all or nothing
    store.update(_batch(0, 200))  # the rerun
    store.update(_batch(200, 2000))
    assert store.count() == 2200 and len(store.distinct("doc_id")) == 2200
    store.close()


def test_jobflow_job_store_on_sqlite(tmp_path):
    from jobflow import JobStore, job, run_locally

    from surfdiff_core.config import StoreConfig
    from surfdiff_core.store import make_maggma_store

    @job
    def add(a: int, b: int) -> int:
        return a + b

    cfg = StoreConfig()
    docs = make_maggma_store(cfg.model_copy(update={"collection": "structures_jobs"}), path=tmp_path / "store")
    data = make_maggma_store(cfg.model_copy(update={"collection": "structures_jobs_data"}), path=tmp_path / "store")
    job_store = JobStore(docs, additional_stores={"data": data})
    first = add(1, 2)
    second = add(first.output, 4)
    responses = run_locally([first, second], store=job_store, root_dir=tmp_path, log=False)
    assert responses[second.uuid][1].output == 7
    job_store.connect()
    assert job_store.get_output(second.uuid) == 7
    assert job_store.count({"uuid": first.uuid}) == 1
    job_store.close()
