"""ResultsStore: StructureDoc in and out of any maggma Store (MontyStore, MongoStore, MemoryStore, JSONStore)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from maggma.core import Store

from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import ConfigError, SurfdiffError
from surfdiff_core.store.documents import StructureDoc, now

MONGO_URI_ENV = "SURFDIFF_MONGO_URI"
_SUMMARY_FIELDS = ["doc_id", "source", "system_id", "cell", "composition", "energy", "fmax", "steps", "oracle"]


def make_maggma_store(cfg: StoreConfig, *, path: str | Path | None = None) -> Store:
    """Build the configured maggma Store. The Mongo URI comes only from the environment."""
    backend = cfg.backend
    if backend == "memory":
        from maggma.stores import MemoryStore

        return MemoryStore(collection_name=cfg.collection, key="doc_id")
    if backend == "monty":
        from maggma.stores import MontyStore

        root = Path(path or cfg.path).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return MontyStore(
            collection_name=cfg.collection, database_path=str(root), database_name=cfg.database,
            storage="sqlite", key="doc_id",
        )
    if backend == "json":
        from maggma.stores import JSONStore

        file = Path(path or cfg.path).expanduser().resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        return JSONStore(str(file), read_only=False, key="doc_id")
    if backend == "mongo":
        from maggma.stores import MongoURIStore

        uri = os.environ.get(MONGO_URI_ENV)
        if not uri:
            raise ConfigError(f"store backend 'mongo' needs the environment variable {MONGO_URI_ENV}")
        return MongoURIStore(uri=uri, database=cfg.database, collection_name=cfg.collection, key="doc_id")
    raise ConfigError(f"unknown store backend {backend!r}")


def ensure_indexes(store: Store, fields: Iterable[str]) -> None:
    """Create indexes where the backend supports them (MontyStore raises NotImplementedError)."""
    for f in fields:
        try:
            store.ensure_index(f)
        except NotImplementedError:
            return


class ResultsStore:
    """Typed access to the documents. Writes are per-document upserts keyed on the deterministic doc_id."""

    def __init__(self, store: Store, *, label: str = "") -> None:
        self.store = store
        self.label = label or type(store).__name__
        self._connected = False
        # montydb answers every query by scanning the whole collection, so an upsert costs O(n) and filling a
        # store O(n²). New documents are therefore inserted directly (O(1), _id = doc_id); the ids already
        # present are read once per connection.
        self._direct_insert = type(store).__name__ == "MontyStore"
        self._known: set[str] = set()

    # ---- connection --------------------------------------------------------------------------------------
    def connect(self) -> ResultsStore:
        if not self._connected:
            try:
                self.store.connect()
            except Exception as exc:  # noqa: BLE001 - any backend failure is reported as one line
                raise SurfdiffError(f"cannot open the results store {self.label}: {exc}") from None
            ensure_indexes(self.store, ["doc_id", "source", "system_id", "composition", "energy"])
            self._connected = True
            if self._direct_insert:
                self._known = set(self.store.distinct("doc_id"))
        return self

    def close(self) -> None:
        if self._connected:
            self.store.close()
            self._connected = False

    def __enter__(self) -> ResultsStore:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------------------
    def put(self, doc: StructureDoc) -> None:
        self.put_many([doc])

    def put_many(self, docs: Iterable[StructureDoc]) -> int:
        """Upsert documents one at a time (each write atomic); keeps the first created_at of a document."""
        self.connect()
        n = 0
        for doc in docs:
            data = doc.model_dump(mode="json")
            data["updated_at"] = now().isoformat()
            if not self._insert_new(data):
                old = self.store.query_one({"doc_id": doc.doc_id}, properties=["created_at"])
                if old and old.get("created_at"):
                    data["created_at"] = old["created_at"]
                self.store.update([data], key="doc_id")
            n += 1
        return n

    def _insert_new(self, data: dict) -> bool:
        """Insert a document not seen before in one O(1) write; False when it may exist (then upsert)."""
        if not self._direct_insert or data["doc_id"] in self._known:
            return False
        from montydb.errors import DuplicateKeyError

        self._known.add(data["doc_id"])
        try:
            self.store._collection.insert_one({**data, "_id": data["doc_id"]})
        except DuplicateKeyError:  # written meanwhile by another process: replace it instead
            return False
        return True

    # ---- reads -------------------------------------------------------------------------------------------
    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        self.connect()
        ids = list(ids)
        found: set[str] = set()
        if len(ids) > 500:  # one pass over the collection instead of one per chunk (embedded stores scan)
            return set(ids) & set(self.store.distinct("doc_id"))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found |= {d["doc_id"] for d in self.store.query({"doc_id": {"$in": chunk}}, properties=["doc_id"])}
        return found

    def get(self, doc_id: str) -> StructureDoc | None:
        self.connect()
        d = self.store.query_one({"doc_id": doc_id})
        return _to_doc(d) if d else None

    def find(self, criteria: dict[str, Any] | None = None) -> Iterator[StructureDoc]:
        self.connect()
        for d in self.store.query(criteria or {}):
            yield _to_doc(d)

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


def _to_doc(d: dict) -> StructureDoc:
    d = {k: v for k, v in d.items() if k not in ("_id", "_bt", "last_updated")}
    return StructureDoc.model_validate(d)


def open_store(cfg: StoreConfig, *, path: str | Path | None = None) -> ResultsStore:
    store = make_maggma_store(cfg, path=path)
    label = f"{cfg.backend}:{path or cfg.path}" if cfg.backend in ("monty", "json") else cfg.backend
    return ResultsStore(store, label=label)
