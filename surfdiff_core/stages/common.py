"""The pipeline's stages as plain functions over (config, store): what the CLI and the Prefect flows call.

rss -> train -> sample (compositions × cells) -> relax the best K per target. No orchestration here: the
flows in flows/ wrap these with retries, caching and artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surfdiff_core.config import SampleConfig, SampleTarget, SurfdiffConfig
from surfdiff_core.errors import ConfigError, SurfdiffError
from surfdiff_core.store import ResultsStore, open_store
from surfdiff_core.system import SurfaceSystem


def store_for(cfg: SurfdiffConfig, store_path: str | None = None) -> ResultsStore:
    return open_store(cfg.store, path=store_path)


def jobs_store_for(cfg: SurfdiffConfig, store_path: str | None = None):
    """maggma store for jobflow's JobStore: the project's store, collection '<collection>_jobs'."""
    from surfdiff_core.store.results import make_maggma_store

    return make_maggma_store(cfg.store.model_copy(update={"collection": f"{cfg.store.collection}_jobs"}),
                             path=store_path)


def data_root(cfg: SurfdiffConfig, store_path: str | None = None) -> Path:
    """Directory beside the store for checkpoints and pictures."""
    base = Path(store_path or cfg.store.path)
    return base.parent if cfg.store.backend in ("monty", "json") else Path("data")


def checkpoint_dir(cfg: SurfdiffConfig, store_path: str | None = None) -> Path:
    return data_root(cfg, store_path) / "checkpoints"


def target_system(cfg: SurfdiffConfig, target: SampleTarget) -> SurfaceSystem:
    from surfdiff_core.rss import resolve_lattice, systems_for

    return systems_for(cfg, target.cell, [target.composition], resolve_lattice(cfg))[target.composition]


def training_system(cfg: SurfdiffConfig) -> SurfaceSystem:
    return target_system(cfg, SampleTarget(cell=cfg.rss.cell, composition=cfg.rss.compositions[0]))


def sample_targets(cfg: SurfdiffConfig, cells: list[str] | None = None,
                   compositions: list[str] | None = None) -> list[SampleTarget]:
    """Explicit targets from the config, or the product of --cell × --composition lists."""
    if cells or compositions:
        if not (cells and compositions):
            raise ConfigError("give both a cell and a composition to sample")
        return [SampleTarget(cell=c, composition=comp) for c in cells for comp in compositions]
    if not cfg.sample.targets:
        raise ConfigError("no sampling targets: set sample.targets in the config or pass --cell/--composition")
    return list(cfg.sample.targets)


def latest_checkpoint(cfg: SurfdiffConfig, store_path: str | None = None) -> Path:
    d = checkpoint_dir(cfg, store_path)
    cands = sorted((p for p in d.glob("model-*.pt") if not p.name.endswith("-last.pt")),
                   key=lambda p: p.stat().st_mtime) if d.exists() else []
    if not cands:
        raise SurfdiffError(f"no trained model in {d}: run `surfdiff train CONFIG` first")
    return cands[-1]


@dataclass
class TrainSummary:
    model_id: str
    checkpoint: str
    epochs: int
    best_val: float
    n_train: int
    n_val: int
    samples_per_second: float
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def run_train(cfg: SurfdiffConfig, store: ResultsStore, *, store_path: str | None = None,
              epochs: int | None = None, progress: bool = True) -> TrainSummary:
    from surfdiff_core.store.models import record_model
    from surfdiff_core.train.trainer import train

    system = training_system(cfg)
    res = train(store, cfg.model, cfg.train, system_id=system.system_id,
                checkpoint_dir=checkpoint_dir(cfg, store_path), progress=progress, max_epochs=epochs)
    record_model(cfg.store, store_path, {
        "model_id": res.model_id, "checkpoint": str(res.checkpoint), "system_id": system.system_id,
        "epochs": res.epochs, "best_val": res.best_val, "n_train": res.n_train, "n_val": res.n_val,
        "model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
        "config_name": cfg.name,
    })
    return TrainSummary(model_id=res.model_id, checkpoint=str(res.checkpoint), epochs=res.epochs,
                        best_val=res.best_val, n_train=res.n_train, n_val=res.n_val,
                        samples_per_second=res.samples_per_second, resumed_from=res.resumed_from,
                        history=res.history)


@dataclass
class SampleSummary:
    cell: str
    composition: str
    system_id: str
    n: int
    n_valid: int
    rejection_rate: float
    best_energy: float | None
    wall_time: float
    structure_steps_per_second: float
    doc_ids: list[str]


def run_sample(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, *, checkpoint: str | Path,
               scfg: SampleConfig | None = None, run_id: str | None = None, progress: bool = True,
               device: str | None = None) -> SampleSummary:
    from surfdiff_core.sample.generate import sample_into_store
    from surfdiff_core.train.trainer import load_checkpoint, pick_device

    scfg = scfg or cfg.sample
    dev = pick_device(device or scfg.device)
    loaded = load_checkpoint(checkpoint, device=dev)
    system = target_system(cfg, target)
    res, docs = sample_into_store(store, loaded, system, scfg, device=dev, run_id=run_id,
                                  checkpoint=str(checkpoint), progress=progress)
    valid = [d for d in docs if d.valid and d.in_box and d.energy is not None]
    wall = res.wall_time if res else 0.0
    return SampleSummary(
        cell=system.cell, composition=system.composition, system_id=system.system_id, n=len(docs),
        n_valid=len(valid), rejection_rate=1 - len(valid) / len(docs) if docs else 0.0,
        best_energy=min((d.energy for d in valid), default=None), wall_time=wall,
        structure_steps_per_second=(res.structure_steps / wall) if res and wall > 0 else 0.0,
        doc_ids=[d.doc_id for d in docs],
    )


def summary_dict(obj: Any) -> dict:
    from dataclasses import asdict

    d = asdict(obj)
    d.pop("history", None)
    d.pop("doc_ids", None)
    return d
