"""Convert a MontyStore directory of earlier surfdiff versions into the configured store.

Structures are rewritten with their frames and forces moved to '<collection>_frames'; every other collection
of the study ('<collection>_models', '_jobs', ...) is copied as it is. The conversion is idempotent and
resumable: documents already in the destination are skipped, so an interrupted run is simply run again.
Migrating in place (the default) adds the SQLite file to the Monty directory and marks it done, after which
the directory opens with the new default backend.
"""

from __future__ import annotations

import logging
from pathlib import Path

from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store.backends import MIGRATED_META, MONTY_MARKER, _sqlite, make_maggma_store, sqlite_file
from surfdiff_core.store.documents import StructureDoc
from surfdiff_core.store.results import BATCH, ResultsStore, _chunks, open_store
from surfdiff_core.store.sqlite_store import SqliteStore

logger = logging.getLogger(__name__)


def _monty(source: Path, database: str, collection: str):
    from maggma.stores import MontyStore

    return MontyStore(collection_name=collection, database_path=str(source), database_name=database,
                      storage="sqlite", key="doc_id")


def _monty_collections(source: Path, database: str) -> list[str]:
    folder = source / database
    return sorted(p.stem for p in folder.glob("*.collection")) if folder.is_dir() else []


def _destination(dest: StoreConfig, dest_path: Path) -> ResultsStore:
    if dest.backend != "sqlite":
        return open_store(dest, path=dest_path)
    frames_cfg = dest.model_copy(update={"collection": f"{dest.collection}_frames"})
    file = sqlite_file(dest, dest_path)  # built directly: the legacy check would refuse an in-place target
    return ResultsStore(_sqlite(dest, file), frames=_sqlite(frames_cfg, file), label=f"sqlite:{file}")


def migrate_store(source_path: str | Path, dest: StoreConfig, dest_path: str | Path | None = None) -> int:
    """Copy the MontyStore at `source_path` into `dest` (default: in place); returns the documents written."""
    source = Path(source_path).expanduser().resolve()
    if not (source / MONTY_MARKER).exists():
        raise SurfdiffError(f"{source} is not a MontyStore directory (no {MONTY_MARKER})")
    target = Path(dest_path).expanduser().resolve() if dest_path else source
    collections = _monty_collections(source, dest.database)
    written = 0
    with _destination(dest, target) as results:
        if dest.collection in collections:
            written += _copy_structures(_monty(source, dest.database, dest.collection), results)
        for name in collections:
            if name.startswith(f"{dest.collection}_") and name != f"{dest.collection}_frames":
                written += _copy_raw(source, dest, target, name)
        if isinstance(results.store, SqliteStore):
            results.store.set_meta(MIGRATED_META, "done")
    logger.info("migrated %d documents from %s", written, source)
    return written


def _copy_structures(old, results: ResultsStore) -> int:
    old.connect()
    try:
        written = 0
        for chunk in _chunks(old.query({}), BATCH):
            present = results.existing_ids(d["doc_id"] for d in chunk)
            fresh = [StructureDoc.model_validate({k: v for k, v in d.items() if k not in ("_id", "last_updated")})
                     for d in chunk if d["doc_id"] not in present]
            written += results.put_many(fresh, stamp=False)
        return written
    finally:
        old.close()


def _copy_raw(source: Path, dest: StoreConfig, target: Path, name: str) -> int:
    old = _monty(source, dest.database, name)
    cfg = dest.model_copy(update={"collection": name})
    new = _sqlite(cfg, sqlite_file(cfg, target)) if dest.backend == "sqlite" else make_maggma_store(cfg, path=target)
    old.connect()
    new.connect()
    try:
        written = 0
        for chunk in _chunks(old.query({}), BATCH):
            # keyed on the original _id: the copy is idempotent whatever the documents are (jobs, models, ...)
            docs = [{**d, "_id": str(d["_id"])} for d in chunk]
            new.update(docs, key="_id")
            written += len(docs)
        return written
    finally:
        old.close()
        new.close()
