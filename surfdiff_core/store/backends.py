"""The configured maggma Store: embedded SQLite (default), MongoDB (production), memory, JSON or legacy Monty.

The Mongo URI comes only from the environment and is never printed: errors name host:port only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maggma.core import Store
from maggma.stores import MemoryStore, MongoStore

from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import ConfigError, SurfdiffError

MONGO_URI_ENV = "SURFDIFF_MONGO_URI"
SQLITE_SUFFIX = ".sqlite3"
MONTY_MARKER = "monty.storage.cfg"  # written by montydb into every MontyStore directory
MIGRATED_META = "migrated_from_monty"
# The memory backend is shared by every store of a process with the same collection (one study in memory).
_MEMORY_STORES: dict[tuple[str, str], Store] = {}


def sqlite_file(cfg: StoreConfig, path: str | Path | None) -> Path:
    """`store.path` is a directory; the database is one file inside it (a path ending in .sqlite3 is the file)."""
    root = Path(path or cfg.path).expanduser().resolve()
    return root if root.suffix in (SQLITE_SUFFIX, ".sqlite", ".db") else root / f"{cfg.database}{SQLITE_SUFFIX}"


def mongo_hosts(uri: str) -> str:
    """host:port list of a MongoDB URI, credentials and options stripped (no DNS lookup, nothing printed)."""
    rest = re.sub(r"^mongodb(\+srv)?://", "", uri)
    hosts = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    default = "" if uri.startswith("mongodb+srv://") else ":27017"
    return ",".join(h if ":" in h.rsplit("]", 1)[-1] else h + default for h in hosts.split(",") if h)


class SafeMongoStore(MongoStore):
    """maggma's MongoStore whose `name` (logged by jobflow and maggma) shows host:port, never the URI."""

    @property
    def name(self) -> str:
        where = mongo_hosts(self.uri) if self.uri else f"{self.host}:{self.port}"
        return f"mongo://{where}/{self.database}/{self.collection_name}"


class ProcessMemoryStore(MemoryStore):
    """The memory backend: one store per (database, collection) and process, shared by the stages of one run;
    closing it must not lose the data, which lives nowhere else."""

    def close(self) -> None:
        pass


def make_maggma_store(cfg: StoreConfig, *, path: str | Path | None = None) -> Store:
    """Build the configured maggma Store for collection `cfg.collection` (key 'doc_id')."""
    backend = cfg.backend
    if backend == "sqlite":
        file = sqlite_file(cfg, path)
        refuse_legacy_monty(file)
        return _sqlite(cfg, file)
    if backend == "memory":
        slot = (cfg.database, cfg.collection)
        if slot not in _MEMORY_STORES:
            _MEMORY_STORES[slot] = ProcessMemoryStore(collection_name=f"{cfg.database}.{cfg.collection}",
                                                      key="doc_id")
        return _MEMORY_STORES[slot]
    if backend == "monty":
        from maggma.stores import MontyStore

        root = Path(path or cfg.path).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return MontyStore(collection_name=cfg.collection, database_path=str(root), database_name=cfg.database,
                          storage="sqlite", key="doc_id")
    if backend == "json":
        from maggma.stores import JSONStore

        file = Path(path or cfg.path).expanduser().resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        return JSONStore(str(file), read_only=False, key="doc_id")
    if backend == "mongo":
        uri = os.environ.get(MONGO_URI_ENV)
        if not uri:
            raise ConfigError(f"store backend 'mongo' needs the environment variable {MONGO_URI_ENV}")
        timeout_ms = max(int(cfg.server_timeout_s * 1000), 1)
        return SafeMongoStore(database=cfg.database, collection_name=cfg.collection, uri=uri, key="doc_id",
                              mongoclient_kwargs={"serverSelectionTimeoutMS": timeout_ms,
                                                  "connectTimeoutMS": timeout_ms})
    raise ConfigError(f"unknown store backend {backend!r}")


def _sqlite(cfg: StoreConfig, file: Path) -> Store:
    from surfdiff_core.store.sqlite_store import SqliteStore

    return SqliteStore(str(file), collection_name=cfg.collection, key="doc_id", timeout=cfg.busy_timeout_s)


def refuse_legacy_monty(file: Path) -> None:
    """An old MontyStore directory opened with the SQLite backend: one line naming the migration command."""
    root = file.parent
    if not (root / MONTY_MARKER).exists():
        return
    if file.exists():
        import sqlite3

        try:
            with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as conn:
                done = conn.execute("SELECT value FROM _surfdiff_meta WHERE name = ?", (MIGRATED_META,)).fetchone()
        except sqlite3.Error:
            done = None
        if done and done[0] == "done":
            return
    raise SurfdiffError(f"{root} is a MontyStore from an earlier surfdiff version; convert it once with: "
                        f"surfdiff store migrate {root}")


def check_reachable(store: Store, timeout_s: float) -> None:
    """Fail fast, in one line without credentials, when a MongoDB server does not answer."""
    if not isinstance(store, MongoStore) or type(store).__name__ in ("MemoryStore", "JSONStore", "MontyStore"):
        return
    import pymongo
    from pymongo.errors import PyMongoError

    client = store._collection.database.client
    if not isinstance(client, pymongo.MongoClient):  # mongomock in tests
        return
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        where = mongo_hosts(store.uri) if store.uri else f"{store.host}:{store.port}"
        raise SurfdiffError(f"cannot reach MongoDB at {where} within {timeout_s:g} s ({type(exc).__name__}); "
                            f"check the server and {MONGO_URI_ENV}") from None


def ensure_indexes(store: Store, fields: Iterable[str], compound: Iterable[tuple[str, ...]] = ()) -> None:
    """Single-field and compound indexes where the backend has them (montydb has none: skipped)."""
    for field in fields:
        try:
            store.ensure_index(field)
        except NotImplementedError:
            return
    for group in compound:
        _ensure_compound(store, tuple(group))


def _ensure_compound(store: Store, fields: tuple[str, ...]) -> Any:
    from surfdiff_core.store.sqlite_store import SqliteStore

    if isinstance(store, SqliteStore):
        return store.ensure_index(fields)
    if isinstance(store, MongoStore):
        return store._collection.create_index([(f, 1) for f in fields])
    return None
