"""Claims on oracle work: processes sharing a store (two `surfdiff rss`, a Slurm array) never compute the same
structure twice.

A claim is one record per document id: its owner (host, pid, a per-process token) and an expiry time that the
owner's heartbeat keeps pushing forward. It is taken atomically: one IMMEDIATE transaction on SQLite (a table
beside the documents), an upsert on a unique `_id` on MongoDB (collection '<collection>_claims'). A claim whose
owner stopped heart-beating (expired), or whose owner was a process on this host that no longer exists, is
taken over. Backends that one process uses alone (memory, JSON, Monty) need no claims and grant every one.

`WorkQueue` hands a driver the ids it now owns, one at a time, and waits for those held by others: an id is
computed only when it is claimed *and* still needed once claimed (another owner may have stored it meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from surfdiff_core.lifetime import pid_alive
from surfdiff_core.store.results import ResultsStore
from surfdiff_core.store.sqlite_store import SqliteStore, quote

CLAIM_TTL_ENV = "SURFDIFF_CLAIM_TTL_S"
DEFAULT_TTL_S = 120.0  # a claim lives this long without a heartbeat (heartbeats every ttl/4)
_CHUNK = 500


def _host() -> str:
    """This host, and its pid namespace where there is one: pids of another container on the same node must
    not look dead to us."""
    try:
        ns = f"/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        ns = ""
    return f"{socket.gethostname()}{ns}"


def claim_ttl() -> float:
    try:
        ttl = float(os.environ.get(CLAIM_TTL_ENV, ""))
    except ValueError:
        ttl = DEFAULT_TTL_S
    return ttl if ttl > 0 else DEFAULT_TTL_S


class ClaimBoard:
    """No claims (a store only this process uses): every claim is granted."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s or claim_ttl()
        self.host, self.pid = _host(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"

    def claim(self, doc_id: str) -> bool:
        return True

    def held_by_others(self, doc_ids: list[str]) -> set[str]:
        return set()

    def renew(self) -> None:
        pass

    def release(self, doc_id: str) -> None:
        pass

    def release_all(self) -> None:
        pass

    def _takeable(self, owner: str, host: str | None, pid: int | None, expires: float, now: float) -> bool:
        return owner == self.owner or expires < now or (host == self.host and pid is not None
                                                       and not pid_alive(int(pid)))

    def _record(self, now: float) -> dict[str, Any]:
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "expires": now + self.ttl_s}


class SqliteClaims(ClaimBoard):
    def __init__(self, store: SqliteStore, ttl_s: float | None = None) -> None:
        super().__init__(ttl_s)
        self._store = store
        self._table = quote(f"_claims:{store.collection_name}")
        with store._write() as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (claim_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                      "host TEXT, pid INTEGER, expires REAL NOT NULL)")

    def claim(self, doc_id: str) -> bool:
        now = time.time()
        with self._store._write() as c:  # read and write in one IMMEDIATE transaction: atomic across processes
            row = c.execute(f"SELECT owner, host, pid, expires FROM {self._table} WHERE claim_id = ?",
                            (doc_id,)).fetchone()
            if row is not None and not self._takeable(*row, now):
                return False
            r = self._record(now)
            c.execute(f"INSERT OR REPLACE INTO {self._table} VALUES (?, ?, ?, ?, ?)",
                      (doc_id, r["owner"], r["host"], r["pid"], r["expires"]))
            return True

    def held_by_others(self, doc_ids: list[str]) -> set[str]:
        now, held = time.time(), set()
        conn = self._store._collection
        for k in range(0, len(doc_ids), _CHUNK):
            chunk = doc_ids[k : k + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for claim_id, owner, host, pid, expires in conn.execute(
                    f"SELECT claim_id, owner, host, pid, expires FROM {self._table} WHERE claim_id IN ({marks})",
                    chunk):
                if not self._takeable(owner, host, pid, expires, now):
                    held.add(claim_id)
        return held

    def renew(self) -> None:
        with self._store._write() as c:
            c.execute(f"UPDATE {self._table} SET expires = ? WHERE owner = ?", (time.time() + self.ttl_s, self.owner))

    def release(self, doc_id: str) -> None:
        with self._store._write() as c:
            c.execute(f"DELETE FROM {self._table} WHERE claim_id = ? AND owner = ?", (doc_id, self.owner))

    def release_all(self) -> None:
        with self._store._write() as c:
            c.execute(f"DELETE FROM {self._table} WHERE owner = ?", (self.owner,))


class MongoClaims(ClaimBoard):
    def __init__(self, collection: Any, ttl_s: float | None = None) -> None:
        super().__init__(ttl_s)
        self._coll = collection

    def claim(self, doc_id: str) -> bool:
        from pymongo.errors import DuplicateKeyError

        now = time.time()
        free = {"_id": doc_id, "$or": [{"owner": self.owner}, {"expires": {"$lt": now}}]}
        try:  # matches a free claim, or inserts a new one; a live claim of another owner: duplicate _id
            self._coll.update_one(free, {"$set": self._record(now)}, upsert=True)
            return True
        except DuplicateKeyError:
            pass
        held = self._coll.find_one({"_id": doc_id})
        if held is None or not self._takeable(held["owner"], held.get("host"), held.get("pid"), held["expires"], now):
            return False
        # a dead owner's claim: taken over only if it is still that owner's (compare and swap on the owner)
        return self._coll.update_one({"_id": doc_id, "owner": held["owner"]},
                                     {"$set": self._record(now)}).matched_count == 1

    def held_by_others(self, doc_ids: list[str]) -> set[str]:
        now, held = time.time(), set()
        for k in range(0, len(doc_ids), _CHUNK):
            for d in self._coll.find({"_id": {"$in": doc_ids[k : k + _CHUNK]}}):
                if not self._takeable(d["owner"], d.get("host"), d.get("pid"), d["expires"], now):
                    held.add(d["_id"])
        return held

    def renew(self) -> None:
        self._coll.update_many({"owner": self.owner}, {"$set": {"expires": time.time() + self.ttl_s}})

    def release(self, doc_id: str) -> None:
        self._coll.delete_one({"_id": doc_id, "owner": self.owner})

    def release_all(self) -> None:
        self._coll.delete_many({"owner": self.owner})


def claim_board(store: ResultsStore, ttl_s: float | None = None) -> ClaimBoard:
    """The claims of `store`'s backend (connected): SQLite and MongoDB share them between processes."""
    from maggma.stores import MemoryStore, MongoStore

    store.connect()
    backend = store.store
    if isinstance(backend, SqliteStore):
        return SqliteClaims(backend, ttl_s)
    if isinstance(backend, MongoStore) and not isinstance(backend, MemoryStore):
        coll = backend._collection
        return MongoClaims(coll.database[f"{coll.name}_claims"], ttl_s)
    return ClaimBoard(ttl_s)


class WorkQueue:
    """The ids of one run, handed out to compute once claimed and still needed; ids claimed by other processes
    are looked at again every `poll_s` until they are stored (done elsewhere) or their claim lapses."""

    def __init__(self, board: ClaimBoard, ids: Iterable[str], needed: Callable[[str], bool],
                 poll_s: float = 1.0, on_elsewhere: Callable[[str], None] | None = None) -> None:
        self.board, self.needed, self.poll_s = board, needed, poll_s
        self.on_elsewhere = on_elsewhere  # told of each id found finished by another process (progress bars)
        self._pending: deque[str] = deque(ids)
        self._held: list[str] = []  # claimed by another process when last tried
        self._checked = 0.0
        self.elsewhere = 0  # found finished by another process
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="claims-heartbeat")

    def __enter__(self) -> WorkQueue:
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
        self.board.release_all()  # an interrupted run frees what it had not finished, at once

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.board.ttl_s / 4):
            with contextlib.suppress(Exception):  # a missed beat only shortens the claims; the next one retries
                self.board.renew()

    def take(self) -> str | None:
        """The next id this process now owns and must compute, or None while none is free."""
        if self._held and time.monotonic() - self._checked >= self.poll_s:
            self._recheck_held()
        while self._pending:
            doc_id = self._pending.popleft()
            if not self.board.claim(doc_id):
                self._held.append(doc_id)
                continue
            if not self.needed(doc_id):  # stored by another owner before we claimed it
                self.board.release(doc_id)
                self.elsewhere += 1
                if self.on_elsewhere is not None:
                    self.on_elsewhere(doc_id)
                continue
            return doc_id
        return None

    def _recheck_held(self) -> None:
        """Held ids whose claim is gone or lapsed go back to be claimed (one read for all of them)."""
        self._checked = time.monotonic()
        still = self.board.held_by_others(self._held)
        self._pending.extend(i for i in self._held if i not in still)
        self._held = [i for i in self._held if i in still]

    def waiting(self) -> bool:
        """Ids remain that other processes hold."""
        return bool(self._held)

    def done(self, doc_id: str) -> None:
        """`doc_id` is stored (or given up for this run): its claim is no longer needed."""
        self.board.release(doc_id)

    def pause(self) -> None:
        time.sleep(self.poll_s)

    def next(self) -> str | None:
        """The next id to compute, waiting while other processes hold the rest; None when nothing is left."""
        while (doc_id := self.take()) is None and self.waiting():
            self.pause()
        return doc_id
