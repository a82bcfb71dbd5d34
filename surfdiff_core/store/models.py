"""Trained-model records beside the structures (collection '<collection>_models'): checkpoint id, path,
training data and settings, so generated documents can be traced back to what produced them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surfdiff_core.config import StoreConfig
from surfdiff_core.store.documents import now
from surfdiff_core.store.results import make_maggma_store


def _models_store(cfg: StoreConfig, store_path: str | Path | None):
    return make_maggma_store(cfg.model_copy(update={"collection": f"{cfg.collection}_models"}),
                             path=store_path)


def record_model(cfg: StoreConfig, store_path: str | Path | None, record: dict[str, Any]) -> None:
    if cfg.backend == "memory":  # a memory store lives in one process only: nothing to share
        return
    store = _models_store(cfg, store_path)
    store.connect()
    try:
        store.update([{**record, "updated_at": now().isoformat()}], key="model_id")
    finally:
        store.close()


def list_models(cfg: StoreConfig, store_path: str | Path | None) -> list[dict[str, Any]]:
    if cfg.backend == "memory":
        return []
    store = _models_store(cfg, store_path)
    store.connect()
    try:
        return [{k: v for k, v in d.items() if k != "_id"} for d in store.query({})]
    finally:
        store.close()
