"""ResultsStore: StructureDoc in and out of any maggma Store (SQLite, MongoStore, MemoryStore, JSON, Monty).

The queried documents stay small: relaxation frames and forces (the MLFF training data) live in a second
collection '<collection>_frames', one document per doc_id, written in the same put_many and loaded on demand
(`find(..., with_frames=True)`, `load_frames`, `get`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from maggma.core import Store

from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store.backends import (
    _MEMORY_STORES,
    MONGO_URI_ENV,
    check_reachable,
    ensure_indexes,
    make_maggma_store,
    sqlite_file,
)
from surfdiff_core.store.documents import Frame, StructureDoc, now
from surfdiff_core.store.sqlite_codec import Encoded
from surfdiff_core.store.sqlite_store import SqliteStore

__all__ = ["_MEMORY_STORES", "MONGO_URI_ENV", "ResultsStore", "make_maggma_store", "open_store"]

FRAME_FIELDS = ("trajectory", "forces")  # heavy arrays kept out of the queried documents
INDEXED_FIELDS = ("doc_id", "study", "system_id", "source", "composition", "cell", "energy_model", "energy",
                  "model_id", "run_id", "parent_id", "valid", "in_box")
# The study's main query: one system, source and composition, lowest energies first.
COMPOUND_INDEXES = (("system_id", "source", "composition", "energy"),)
_SUMMARY_FIELDS = ["doc_id", "source", "system_id", "cell", "composition", "energy", "fmax", "steps", "oracle"]
BATCH = 500


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A batch's documents are millions of small lists without cycles: the cyclic GC rescanning them on every
    allocation threshold made conversion 8x slower. Paused for the batch only, restored as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(items: Iterable[Any], size: int = BATCH) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class ResultsStore:
    """Typed access to the documents. Writes are batched upserts keyed on the deterministic doc_id."""

    def __init__(self, store: Store, *, frames: Store | None = None, label: str = "",
                 server_timeout_s: float = 5.0) -> None:
        self.store = store
        self.frames = frames
        self.label = label or type(store).__name__
        self._server_timeout_s = server_timeout_s
        self._connected = False

    # ---- connection --------------------------------------------------------------------------------------
    def connect(self) -> ResultsStore:
        if self._connected:
            return self
        try:
            for s in self._stores():
                s.connect()
            check_reachable(self.store, self._server_timeout_s)
            ensure_indexes(self.store, INDEXED_FIELDS, COMPOUND_INDEXES)
            if self.frames is not None:
                ensure_indexes(self.frames, ["doc_id"])
        except SurfdiffError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure is reported as one line
            raise SurfdiffError(f"cannot open the results store {self.label}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        self._connected = True
        return self

    def _stores(self) -> list[Store]:
        return [self.store] if self.frames is None else [self.store, self.frames]

    def close(self) -> None:
        if self._connected:
            for s in self._stores():
                s.close()
            self._connected = False

    def __enter__(self) -> ResultsStore:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------------------
    def put(self, doc: StructureDoc) -> None:
        self.put_many([doc])

    def put_many(self, docs: Iterable[StructureDoc], *, stamp: bool = True) -> int:
        """Upsert in batches of 500, each one transaction on SQLite; keeps the first created_at of a document.

        Frames are written before their documents, so a visible document always has its frames; a batch
        interrupted between the two leaves only frames, which its rerun overwrites. `stamp=False` keeps
        updated_at as given (migration).
        """
        self.connect()
        n = 0
        for batch in _chunks(docs):
            with _gc_paused():
                n += self._put_batch(batch, stamp)
        return n

    def _put_batch(self, batch: list[StructureDoc], stamp: bool) -> int:
        rows = [self._row(d, stamp) for d in batch]
        created = {d["doc_id"]: d.get("created_at")
                   for d in self.store.query({"doc_id": {"$in": [r[0]["doc_id"] for r in rows]}},
                                             properties=["doc_id", "created_at"])}
        for data, _ in rows:
            data["created_at"] = created.get(data["doc_id"]) or data["created_at"]
        if self.frames is not None:
            self.frames.update([frames for _, frames in rows], key="doc_id")
        self.store.update([data for data, _ in rows], key="doc_id")
        return len(rows)

    def _row(self, doc: StructureDoc, stamp: bool) -> tuple[dict, dict | Encoded]:
        if self.frames is None:
            data = orjson.loads(doc.model_dump_json())  # pydantic's JSON serialiser: much faster than model_dump
            frames: dict | Encoded = {"doc_id": doc.doc_id}
        else:
            data = orjson.loads(doc.model_dump_json(exclude=set(FRAME_FIELDS)))
            text = doc.model_dump_json(include={"doc_id", *FRAME_FIELDS})
            if isinstance(self.frames, SqliteStore):  # the bulk of the bytes: stored as serialised, never parsed
                frames = Encoded(text, {"doc_id": doc.doc_id, "trajectory": [],
                                        "forces": None if doc.forces is None else []})
            else:
                frames = orjson.loads(text)
        if stamp:
            data["updated_at"] = now().isoformat()
        return data, frames

    # ---- reads -------------------------------------------------------------------------------------------
    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        self.connect()
        found: set[str] = set()
        for chunk in _chunks(ids):
            found |= {d["doc_id"] for d in self.store.query({"doc_id": {"$in": chunk}}, properties=["doc_id"])}
        return found

    def get(self, doc_id: str) -> StructureDoc | None:
        """The complete document, frames and forces included."""
        self.connect()
        d = self.store.query_one({"doc_id": doc_id})
        if not d:
            return None
        return _to_doc(d, self._frame_docs([doc_id]).get(doc_id))

    def find(self, criteria: dict[str, Any] | None = None, *, sort: list[tuple[str, int]] | None = None,
             limit: int | None = None, with_frames: bool = False) -> Iterator[StructureDoc]:
        """Matching documents; without `with_frames` they come back with trajectory=[] and forces=None."""
        self.connect()
        rows = self.store.query(criteria or {}, sort=dict(sort) if sort else None, limit=limit or 0)
        for batch in _chunks(rows):
            heavy = self._frame_docs([d["doc_id"] for d in batch]) if with_frames else {}
            for d in batch:
                yield _to_doc(d, heavy.get(d["doc_id"]), lean=not with_frames)

    def load_frames(self, doc_ids: Iterable[str]) -> dict[str, list[Frame]]:
        """Relaxation frames of the given documents (documents without frames are left out)."""
        self.connect()
        out: dict[str, list[Frame]] = {}
        for chunk in _chunks(doc_ids):
            for doc_id, heavy in self._frame_docs(chunk).items():
                if heavy.get("trajectory"):
                    out[doc_id] = [Frame.model_validate(f) for f in heavy["trajectory"]]
        return out

    def _frame_docs(self, doc_ids: list[str]) -> dict[str, dict]:
        if self.frames is None:
            return {}
        return {d["doc_id"]: d for d in self.frames.query({"doc_id": {"$in": list(doc_ids)}},
                                                          properties=["doc_id", *FRAME_FIELDS])}

    def find_raw(self, criteria: dict[str, Any] | None = None, properties: list[str] | None = None) -> list[dict]:
        self.connect()
        return [
            {k: v for k, v in d.items() if k != "_id"}
            for d in self.store.query(criteria or {}, properties=properties or _SUMMARY_FIELDS)
        ]

    def count(self, criteria: dict[str, Any] | None = None) -> int:
        self.connect()
        return self.store.count(criteria or {})

    def distinct(self, field: str, criteria: dict[str, Any] | None = None) -> list:
        self.connect()
        return self.store.distinct(field, criteria or {})


def _to_doc(d: dict, heavy: dict | None = None, *, lean: bool = False) -> StructureDoc:
    d = {k: v for k, v in d.items() if k not in ("_id", "_bt", "last_updated")}
    if heavy:
        d.update({f: heavy[f] for f in FRAME_FIELDS if f in heavy})
    elif lean:
        d["trajectory"] = []
    return StructureDoc.model_validate(d)


def open_store(cfg: StoreConfig, *, path: str | Path | None = None) -> ResultsStore:
    """The results store of `cfg` with its frames collection beside it."""
    store = make_maggma_store(cfg, path=path)
    frames_cfg = cfg.model_copy(update={"collection": f"{cfg.collection}_frames"})
    if cfg.backend == "json":  # a JSON store is one file per collection
        file = Path(path or cfg.path).expanduser().resolve()
        frames_path: str | Path | None = file.with_name(f"{file.stem}_frames{file.suffix or '.json'}")
    else:
        frames_path = path
    frames = make_maggma_store(frames_cfg, path=frames_path)
    if cfg.backend == "sqlite":
        label = f"sqlite:{sqlite_file(cfg, path)}"
    elif cfg.backend in ("monty", "json"):
        label = f"{cfg.backend}:{path or cfg.path}"
    else:
        label = cfg.backend
    return ResultsStore(store, frames=frames, label=label, server_timeout_s=cfg.server_timeout_s)
