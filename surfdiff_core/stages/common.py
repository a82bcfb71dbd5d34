"""What every stage shares: the study's store, where its files go, and the systems it works on.

`--store PATH` has one meaning everywhere: the embedded store at PATH. `with_store_path` applies it to
the config once, so every stage after that reads the store location from the config alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from surfdiff_core.config import SampleTarget, StoreConfig, SurfdiffConfig
from surfdiff_core.errors import ConfigError
from surfdiff_core.stages.sweep import expand_sweep, unique_targets
from surfdiff_core.store import ResultsStore, open_store
from surfdiff_core.store.models import ModelRegistry
from surfdiff_core.system import SurfaceSystem

EMBEDDED_BACKENDS = ("sqlite", "monty", "json")
log = logging.getLogger(__name__)


def with_store_path(cfg: SurfdiffConfig, store_path: str | Path | None) -> SurfdiffConfig:
    """The config with `--store PATH` applied: the embedded store at PATH (a server or in-memory backend
    is swapped for the embedded default)."""
    if not store_path:
        return cfg
    backend = cfg.store.backend
    if backend not in EMBEDDED_BACKENDS:
        backend = StoreConfig.model_fields["backend"].default
    store = cfg.store.model_copy(update={"backend": backend, "path": str(store_path)})
    return cfg.model_copy(update={"store": store})


def open_study_store(cfg: SurfdiffConfig) -> ResultsStore:
    return open_store(cfg.store)


def check_store_writable(cfg: SurfdiffConfig) -> None:
    """Before any work: the embedded store's directory and the data folder beside it (checkpoints, figures) can
    be written and have store.min_free_mb free; one line naming the folder otherwise. Nothing is created."""
    from surfdiff_core.store.backends import sqlite_file

    folders = [data_root(cfg)]
    if cfg.store.backend == "sqlite":
        file = sqlite_file(cfg.store, None)
        folders.insert(0, file.parent)
        if file.exists() and not os.access(file, os.W_OK):
            raise ConfigError(f"the results store {file} is read-only")
    elif cfg.store.backend in ("monty", "json"):
        folders.insert(0, Path(cfg.store.path).expanduser().resolve().parent)
    for folder in folders:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{existing} is a file, so {folder} cannot be made for the store's files")
        try:  # a real write: access() passes for root and cannot see every read-only mount
            with tempfile.TemporaryFile(dir=existing, prefix=".surfdiff-write-check-"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write to {existing} (for {folder}): {exc.strerror or exc}") from None
        free_mb = shutil.disk_usage(existing).free / 2**20
        if free_mb < cfg.store.min_free_mb:
            raise ConfigError(f"only {free_mb:.1f} MB free on the file system of {existing}; the store needs "
                              f"store.min_free_mb = {cfg.store.min_free_mb:g} MB")


def model_registry(cfg: SurfdiffConfig) -> ModelRegistry:
    return ModelRegistry(cfg.store)


def jobs_store_for(cfg: SurfdiffConfig):
    """maggma store for jobflow's JobStore: the study's store, collection '<collection>_jobs'."""
    from surfdiff_core.store.results import make_maggma_store

    return make_maggma_store(cfg.store.model_copy(update={"collection": f"{cfg.store.collection}_jobs"}))


def data_root(cfg: SurfdiffConfig) -> Path:
    """Directory beside an embedded store for checkpoints and pictures (./data for a server store); absolute,
    so the model registry's checkpoint paths do not depend on where a later command runs."""
    root = Path(cfg.store.path).parent if cfg.store.backend in EMBEDDED_BACKENDS else Path("data")
    return root.expanduser().resolve()


def checkpoint_dir(cfg: SurfdiffConfig) -> Path:
    return data_root(cfg) / "checkpoints"


def figure_dir(cfg: SurfdiffConfig) -> Path:
    return data_root(cfg) / "figures" / cfg.name


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def target_system(cfg: SurfdiffConfig, target: SampleTarget) -> SurfaceSystem:
    """The target's system: built once per process, a fresh copy for each caller (system_build.study_system)."""
    from surfdiff_core.system_build import study_system

    return study_system(cfg, target.cell, target.composition)


def training_system(cfg: SurfdiffConfig) -> SurfaceSystem:
    return target_system(cfg, SampleTarget(cell=cfg.rss.cell, composition=cfg.rss.compositions[0]))


def sample_targets(cfg: SurfdiffConfig, cells: list[str] | None = None,
                   compositions: list[str] | None = None) -> list[SampleTarget]:
    """The product of --cell × --composition lists when given; else the config's targets, then its sweep's
    (expanded and checked: one line naming a target that cannot fit its box), each once."""
    if cells or compositions:
        if not (cells and compositions):
            raise ConfigError("give both a cell and a composition to sample")
        return [SampleTarget(cell=c, composition=comp) for c in cells for comp in compositions]
    targets = list(cfg.sample.targets)
    if cfg.sample.sweep is not None:
        from surfdiff_core.system_build import resolve_lattice

        expansion = expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement, lattice=resolve_lattice(cfg),
                                 min_distance_scale=cfg.rss.min_distance_scale)
        log.info(expansion.summary())
        targets += expansion.targets
    if not targets:
        raise ConfigError("no sampling targets: set sample.targets or sample.sweep in the config or pass "
                          "--cell/--composition")
    return unique_targets(targets, cfg.substrate.facet)


def training_energy_models(cfg: SurfdiffConfig) -> tuple[str, ...]:
    return tuple(cfg.train.energy_models or [cfg.oracle.energy_model])
