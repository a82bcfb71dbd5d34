"""Training stage: the denoiser + MLFF on the study's data of one system and energy model, registered."""

from __future__ import annotations

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages.common import (
    checkpoint_dir,
    model_registry,
    new_run_id,
    training_energy_models,
    training_system,
)
from surfdiff_core.stages.results import RSSResult, TrainResult
from surfdiff_core.store import ResultsStore
from surfdiff_core.store.models import ModelRecord, file_sha256

VALIDITY_WARNING = 0.5  # below this fraction of valid samples the model is too weak to rank on


def sample_validity_check(cfg: SurfdiffConfig, checkpoint: str, *, n_train: int, device: str = "auto",
                          n: int = 8) -> tuple[float | None, str | None]:
    """Valid fraction of a few samples of the first target (or the training cell) right after training,
    with a warning when the data or the model are too small for valid samples. The model's own samples: the
    overlap wall (sample.repulsion) is off here, since it repairs exactly the collapse this check detects."""
    from surfdiff_core.config import SampleTarget
    from surfdiff_core.sample.generate import generate
    from surfdiff_core.stages.common import target_system
    from surfdiff_core.train.trainer import load_checkpoint, pick_device

    target = (cfg.sample.targets or [SampleTarget(cell=cfg.rss.cell, composition=cfg.rss.compositions[0])])[0]
    system = target_system(cfg, target)
    dev = pick_device(device)
    scfg = cfg.sample.model_copy(update={"n": n, "batch_size": n, "seed": cfg.sample.seed + 104729,
                                         "repulsion": 0.0})
    try:
        res = generate(load_checkpoint(checkpoint, device=dev), system, scfg, device=dev, progress=False)
    except SurfdiffError:  # a target the model cannot sample (elements) is reported by the sample stage
        return None, None
    valid = sum(res.valid) / max(res.n, 1)
    if valid >= VALIDITY_WARNING:
        return valid, None
    return valid, (f"only {valid:.0%} of {res.n} test samples of {system.composition} {system.cell} are valid: "
                   f"{n_train} training structures or this model size may be too small (more RSS data, epochs, "
                   f"model.n_features or n_interactions help)")


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: RSSResult | None = None, *,
        epochs: int | None = None, device: str | None = None, run_id: str | None = None, progress: bool = True,
        round_index: int | None = None, learned_systems: tuple[str, ...] = (),
        learned_labels: tuple[str, ...] = (), init_from: str | None = None) -> TrainResult:
    """Train (or resume) on the documents of this study, training system and energy model(s).

    `upstream` (the RSS stage's result) fixes the system and energy model; without it they come from the
    config. Active learning passes `learned_systems` and `learned_labels` (the ids of its oracle labels in
    those cells, every round of its own chain so far: they join the data), `init_from` (the previous round's
    checkpoint) and `round_index`."""
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import train

    system_id = training_system(cfg).system_id
    models = training_energy_models(cfg)
    if upstream is not None and (upstream.system_id, upstream.energy_model) != (system_id, models[0]):
        raise SurfdiffError(f"the RSS result ({upstream.system_id}, {upstream.energy_model}) is not this "
                            f"study's training system and energy model ({system_id}, {models[0]})")
    tcfg = cfg.train if device is None else cfg.train.model_copy(update={"device": device})
    scope = DataScope(study=cfg.name, system_id=system_id, energy_models=models, learned_systems=learned_systems,
                      learned_labels=learned_labels)
    res = train(store, cfg.model, tcfg, scope=scope, checkpoint_dir=checkpoint_dir(cfg), progress=progress,
                max_epochs=epochs, init_from=init_from)
    sha = file_sha256(res.checkpoint)
    with model_registry(cfg) as registry:
        registry.record(ModelRecord(
            model_id=res.model_id, checkpoint=str(res.checkpoint), sha256=sha, study=cfg.name,
            system_id=system_id, energy_models=list(models), epochs=res.epochs, best_val=res.best_val,
            n_train=res.n_train, n_val=res.n_val, model=cfg.model.model_dump(mode="json"),
            train=cfg.train.model_dump(mode="json"), round=round_index, learned_labels=list(learned_labels),
        ))
    validity, warning = sample_validity_check(cfg, str(res.checkpoint), n_train=res.n_train, device=tcfg.device)
    return TrainResult(
        study=cfg.name, run_id=run_id or new_run_id(), config_hash=cfg.section_hash("model", "train"),
        sample_validity=validity, warning=warning,
        model_id=res.model_id, checkpoint=str(res.checkpoint), sha256=sha, system_id=system_id,
        energy_models=list(models), epochs=res.epochs, best_val=res.best_val, n_train=res.n_train,
        n_val=res.n_val, samples_per_second=res.samples_per_second, resumed_from=res.resumed_from,
        learned_labels=list(learned_labels),
        training_doc_ids=res.doc_ids, history=res.history,
    )
