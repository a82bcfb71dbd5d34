"""SqliteStore: a maggma Store over one SQLite file in WAL mode (embedded, crash-safe, several writers).

One table per collection (rowid, document as JSON text). Queried fields are indexed with expression indexes on
json_extract(doc, '$.field'); Mongo-style criteria, sort, skip, limit and projections are pushed down to SQL
(see sqlite_query), and whatever SQL cannot express exactly is filtered again in Python with mongomock's
matcher, so results always match Mongo's. Writes are batched in one IMMEDIATE transaction each, which
serialises writers across processes (busy_timeout plus retries) and makes every batch all-or-nothing.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from maggma.core import Store, StoreError
from monty.json import jsanitize

from surfdiff_core.store import sqlite_codec as codec
from surfdiff_core.store.sqlite_query import (
    Census,
    add_to_census,
    extract,
    json_path,
    order_by,
    path_is_scalar,
    translate,
)

META_TABLE = "_surfdiff_meta"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteStore(Store):
    """maggma Store on SQLite. `database_path` is the file; each collection is a table in it."""

    def __init__(self, database_path: str, collection_name: str, timeout: float = 60.0, **kwargs: Any) -> None:
        self.database_path = str(database_path)
        self.collection_name = collection_name
        self.timeout = float(timeout)
        self.kwargs = kwargs
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._indexed: set[tuple[str, ...]] = set()
        kwargs.setdefault("key", "task_id")
        super().__init__(**kwargs)

    # ---- maggma identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"sqlite://{self.database_path}/{self.collection_name}"

    @property
    def _collection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("Must connect the SqliteStore before attempting to use it")
        return self._conn

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SqliteStore):
            return False
        mine = (Path(self.database_path).resolve(), self.collection_name, self.last_updated_field)
        return mine == (Path(other.database_path).resolve(), other.collection_name, other.last_updated_field)

    def __hash__(self) -> int:
        return hash((str(Path(self.database_path).resolve()), self.collection_name, self.last_updated_field))

    # ---- connection --------------------------------------------------------------------------------------
    def connect(self, force_reset: bool = False) -> None:
        if self._conn is not None and not force_reset:
            return
        self.close()
        Path(self.database_path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.database_path, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        self._conn = conn
        self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process never loses a commit
        conn.execute("PRAGMA cache_size=-65536")
        with self._write() as c:  # race-free creation: two processes opening a fresh store both succeed
            c.execute(f"CREATE TABLE IF NOT EXISTS {quote(self.collection_name)} "
                      "(rid INTEGER PRIMARY KEY, doc TEXT NOT NULL)")
            c.execute(f"CREATE TABLE IF NOT EXISTS {META_TABLE} (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.ensure_index(self.key)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _retry(self, action: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the write lock is taken up front, so it never fails half-way for lock."""
        conn = self._collection
        with self._lock:
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- type census: which paths ever held arrays (those need Python filtering) -----------------------
    @property
    def _census_name(self) -> str:
        return f"census:{self.collection_name}"

    def _census(self) -> Census:
        row = self._collection.execute(f"SELECT value FROM {META_TABLE} WHERE name = ?",
                                       (self._census_name,)).fetchone()
        return {k: set(v) for k, v in codec.decode(row[0]).items()} if row else {}

    def _save_census(self, census: Census) -> None:
        value = json.dumps({k: sorted(v) for k, v in census.items()})
        self._collection.execute(f"INSERT INTO {META_TABLE} (name, value) VALUES (?, ?) "
                                 "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (self._census_name, value))

    def get_meta(self, name: str) -> str | None:
        row = self._collection.execute(f"SELECT value FROM {META_TABLE} WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        with self._write() as c:
            c.execute(f"INSERT INTO {META_TABLE} (name, value) VALUES (?, ?) "
                      "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))

    # ---- indexes -----------------------------------------------------------------------------------------
    def ensure_index(self, key: str | list[str] | tuple[str, ...], unique: bool | None = False) -> bool:
        """Index one field, or several in order (a compound index: equality fields first, the sort last)."""
        fields = (key,) if isinstance(key, str) else tuple(key)
        paths = [json_path(f) for f in fields]
        if not fields or any(p is None for p in paths):
            return False
        if fields in self._indexed:
            return True
        name = f"ix:{self.collection_name}:{'+'.join(fields)}{':unique' if unique else ''}"
        exists = self._collection.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
                                          (name,)).fetchone()
        if not exists:
            columns = ", ".join(f"json_extract(doc, {p})" for p in paths)
            with self._write() as c:
                c.execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {quote(name)} "
                          f"ON {quote(self.collection_name)} ({columns})")
        self._indexed.add(fields)
        return True

    # ---- reads -------------------------------------------------------------------------------------------
    def _rows(self, sql: str, params: list[Any]) -> Iterator[tuple]:
        cursor = self._collection.execute(sql, params)
        while rows := cursor.fetchmany(256):
            yield from rows

    def query(self, criteria: dict | None = None, properties: dict | list | None = None,
              sort: dict | None = None, skip: int = 0, limit: int = 0, **kwargs: Any) -> Iterator[dict]:
        criteria = codec.normalise(criteria or {})
        census = self._census()
        where = translate(criteria, census)
        include, exclude = codec.parse_properties(properties)
        table = quote(self.collection_name)
        # Exact filters read only the top-level fields asked for; the rest decode whole documents.
        tops = None if include is None or not where.exact else sorted({f.split(".")[0] for f in include})
        columns = "doc" if tops is None else ", ".join(f"doc -> {json_path(t)}" for t in tops)
        sql = f"SELECT {columns} FROM {table} WHERE {where.sql}{order_by(sort)}"
        params = list(where.params)
        if where.exact and (limit or skip):
            sql += " LIMIT ? OFFSET ?"
            params += [limit if limit else -1, skip]
        yield from self._select(sql, params, criteria, where.exact, tops, include, exclude, skip, limit)

    def _select(self, sql: str, params: list[Any], criteria: dict, exact: bool, tops: list[str] | None,
                include: list[str] | None, exclude: list[str], skip: int, limit: int) -> Iterator[dict]:
        matched = 0
        for row in self._rows(sql, params):
            if tops is not None:
                doc = {t: codec.decode(v) for t, v in zip(tops, row, strict=True) if v is not None}
            else:
                doc = codec.decode(row[0])
                if not exact:
                    if not codec.matches(criteria, doc):
                        continue
                    matched += 1
                    if matched <= skip:
                        continue
            yield codec.project(doc, include, exclude) if (include is not None or exclude) else doc
            if not exact and limit and matched - skip >= limit:
                return

    def count(self, criteria: dict | None = None, **kwargs: Any) -> int:
        where = translate(codec.normalise(criteria or {}), self._census())
        if where.exact:
            sql = f"SELECT COUNT(*) FROM {quote(self.collection_name)} WHERE {where.sql}"
            return int(self._collection.execute(sql, where.params).fetchone()[0])
        return sum(1 for _ in self.query(criteria, properties=[self.key]))

    def distinct(self, field: str, criteria: dict | None = None, all_exist: bool = False) -> list:
        criteria = codec.normalise(criteria or {})
        census = self._census()
        where = translate(criteria, census)
        kinds = census.get(field, set())
        path = json_path(field)
        if where.exact and path and path_is_scalar(field, census) and kinds <= {"string", "number", "null"}:
            table = quote(self.collection_name)
            x = f"json_extract(doc, {path})"
            values = [r[0] for r in self._rows(f"SELECT DISTINCT {x} FROM {table} WHERE {where.sql}", where.params)]
            out = [v for v in values if v is not None]
            if "null" in kinds and None in values:  # NULL is also a missing field: keep only explicit nulls
                sql = f"SELECT 1 FROM {table} WHERE ({where.sql}) AND json_type(doc, {path}) = 'null' LIMIT 1"
                if self._collection.execute(sql, where.params).fetchone():
                    out.append(None)
            return out
        seen: dict[str, Any] = {}
        for doc in self.query(criteria, properties=[field]):
            for v in codec.values_at(doc, field.split(".")):
                seen.setdefault(json.dumps(v, sort_keys=True), v)
        return list(seen.values())

    def groupby(self, keys: list[str] | str, criteria: dict | None = None, properties: dict | list | None = None,
                sort: dict | None = None, skip: int = 0, limit: int = 0) -> Iterator[tuple[dict, list[dict]]]:
        keys = [keys] if isinstance(keys, str) else list(keys)
        include, _ = codec.parse_properties(properties)
        props = None if include is None else sorted({*include, *keys})
        groups: dict[str, tuple[dict, list[dict]]] = {}
        for doc in self.query(criteria, properties=props, sort=sort, skip=skip, limit=limit):
            values = [codec.get_path(doc, k) for k in keys]
            label = json.dumps(values, sort_keys=True, default=str)
            if label not in groups:
                id_doc: dict = {}
                for k, v in zip(keys, values, strict=True):
                    node = id_doc
                    *parents, last = k.split(".")
                    for p in parents:
                        node = node.setdefault(p, {})
                    node[last] = v
                groups[label] = (id_doc, [])
            groups[label][1].append(doc)
        yield from groups.values()

    @property
    def last_updated(self) -> datetime:
        value = super().last_updated
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    # ---- writes ------------------------------------------------------------------------------------------
    def update(self, docs: list[dict | codec.Encoded] | dict, key: list | str | None = None) -> None:
        """Upsert `docs` (replace the document with the same key values) in one transaction; documents may come
        pre-encoded (sqlite_codec.Encoded), as ResultsStore writes the bulky frames."""
        docs = docs if isinstance(docs, list) else [docs]
        keys = [key or self.key] if isinstance(key or self.key, str) else list(key)  # type: ignore[arg-type]
        prepared = []
        for d in docs:
            if isinstance(d, codec.Encoded):
                prepared.append((d.head, d.text))
                continue
            text = codec.plain_json(d)  # plain JSON already (the usual case): no sanitising pass
            if text is None:
                d = jsanitize(d, allow_bson=True, recursive_msonable=True)
                text = codec.encode(d)
                d = codec.decode(text)
            if self.validator and not self.validator.is_valid(d):
                if self.validator.strict:
                    raise ValueError(self.validator.validation_errors(d))
                self.logger.error(self.validator.validation_errors(d))
                continue
            prepared.append((d, text))
        if not prepared:
            return
        self.ensure_index(keys)
        table = quote(self.collection_name)
        with self._write() as c:
            census = self._census()
            grew = False
            for doc, _ in prepared:
                grew |= add_to_census(census, doc)
            known = self._rids_by_key(c, keys, [doc for doc, _ in prepared], census)
            for doc, text in prepared:
                value = doc.get(keys[0]) if known is not None else None
                if known is not None and isinstance(value, str):
                    rid = known.get(value)
                else:
                    rid = self._find_rid(c, {k: doc[k] for k in keys}, census)
                if rid is None:
                    cur = c.execute(f"INSERT INTO {table} (doc) VALUES (?)", (text,))
                    if known is not None and isinstance(value, str):
                        known[value] = int(cur.lastrowid)  # a later copy in the batch replaces this one
                else:
                    c.execute(f"UPDATE {table} SET doc = ? WHERE rid = ?", (text, rid))
            if grew:
                self._save_census(census)

    def _rids_by_key(self, conn: sqlite3.Connection, keys: list[str], docs: list[dict],
                     census: Census) -> dict[str, int] | None:
        """Row ids of the stored documents whose single string key is among `docs`' keys, in one indexed
        query per 500 (None where that shortcut does not apply: compound keys, or no string key at all)."""
        values = [d.get(keys[0]) for d in docs] if len(keys) == 1 else []
        strings = sorted({v for v in values if isinstance(v, str)})
        if not strings:
            return None
        found: dict[str, int] = {}
        sql = f"SELECT rid, {extract(keys[0])} FROM {quote(self.collection_name)} WHERE "
        for k in range(0, len(strings), 500):
            where = translate({keys[0]: {"$in": strings[k : k + 500]}}, census)
            if not where.exact:
                return None
            for rid, value in conn.execute(sql + where.sql, where.params):
                found.setdefault(value, int(rid))
        return found

    def _find_rid(self, conn: sqlite3.Connection, match: dict, census: Census) -> int | None:
        where = translate(match, census)
        sql = f"SELECT rid, doc FROM {quote(self.collection_name)} WHERE {where.sql}"
        for rid, text in conn.execute(sql + (" LIMIT 1" if where.exact else ""), where.params):
            if where.exact or codec.matches(match, codec.decode(text)):
                return int(rid)
        return None

    def remove_docs(self, criteria: dict) -> None:
        criteria = codec.normalise(criteria or {})
        table = quote(self.collection_name)
        with self._write() as c:
            where = translate(criteria, self._census())
            if where.exact:
                c.execute(f"DELETE FROM {table} WHERE {where.sql}", where.params)
                return
            rows = c.execute(f"SELECT rid, doc FROM {table} WHERE {where.sql}", where.params).fetchall()
            doomed = [(rid,) for rid, text in rows if codec.matches(criteria, codec.decode(text))]
            c.executemany(f"DELETE FROM {table} WHERE rid = ?", doomed)
