"""Training stage: the denoiser + MLFF on the study's data of one system and energy model, registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surfdiff_core.config import SurfdiffConfig, TrainConfig
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
from surfdiff_core.store.models import ModelRecord, file_sha256, verify_checkpoint

if TYPE_CHECKING:
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import TrainingRun

VALIDITY_WARNING = 0.5  # below this fraction of valid samples the model is too weak to rank on


def sample_validity_check(cfg: SurfdiffConfig, checkpoint: str, *, n_train: int, device: str = "auto",
                          n: int = 8) -> tuple[float | None, str | None]:
    """Valid fraction of a few samples of the first target (or the training cell) right after training,
    with a warning when the data or the model are too small for valid samples. The model's own samples: the
    overlap wall (sample.repulsion) is off here, since it repairs exactly the collapse this check detects, and so
    are inpainting, seeds and novelty guidance."""
    from surfdiff_core.config import SampleTarget
    from surfdiff_core.sample.generate import generate
    from surfdiff_core.stages.common import sample_targets, target_system
    from surfdiff_core.train.checkpoint import load_checkpoint
    from surfdiff_core.train.trainer import pick_device

    firsts = cfg.sample.targets or (sample_targets(cfg)[:1] if cfg.sample.sweep else [])  # the sweep's first
    target = (firsts or [SampleTarget(cell=cfg.rss.cell, composition=cfg.rss.compositions[0])])[0]
    system = target_system(cfg, target)
    dev = pick_device(device)
    scfg = cfg.sample.model_copy(update={"n": n, "batch_size": n, "seed": cfg.sample.seed + 104729,
                                         "repulsion": 0.0, "inpaint": None, "seed_structure": None, "novelty": 0.0})
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


@dataclass(frozen=True)
class ActiveLearningRound:
    """What a round of active learning adds to training: its index, the cells and ids of its oracle labels
    (every round of its own chain so far: they join the data), and the model it fine-tunes (the previous round's
    checkpoint and its committee's model ids, and the ids of what its training data cost, carried forward)."""

    index: int | None = None
    learned_systems: tuple[str, ...] = ()
    learned_labels: tuple[str, ...] = ()
    init_from: str | None = None
    init_committee: tuple[str, ...] = ()
    data_cost_ids: tuple[str, ...] = ()


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: RSSResult | None = None, *,
        epochs: int | None = None, device: str | None = None, run_id: str | None = None, progress: bool = True,
        round_of: ActiveLearningRound | None = None) -> TrainResult:
    """Train (or resume) on the documents of this study, training system and energy model(s), and the
    MLFF committee members when `train.ensemble` > 1.

    `upstream` (the RSS stage's result) fixes the system and energy model; without it they come from the
    config. Active learning passes `round_of`: what its round adds (labels, the model it fine-tunes)."""
    r = round_of or ActiveLearningRound()
    round_index, learned_systems, learned_labels = r.index, r.learned_systems, r.learned_labels
    init_from, init_committee = r.init_from, r.init_committee
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import train

    system_id = training_system(cfg).system_id
    models = training_energy_models(cfg)
    if upstream is not None and (upstream.system_id, upstream.energy_model) != (system_id, models[0]):
        raise SurfdiffError(f"the RSS result ({upstream.system_id}, {upstream.energy_model}) is not this "
                            f"study's training system and energy model ({system_id}, {models[0]})")
    tcfg = cfg.train if device is None else cfg.train.model_copy(update={"device": device})
    pretrained, parent_cost_ids = None, ()
    if cfg.train.init_from:  # every round of the chain descends from it; the first starts from its weights
        start, committee_start, pretrained, parent_cost_ids = initial_model(cfg)
        if init_from is None:
            init_from, init_committee = start, committee_start
    scope = DataScope(study=cfg.name, system_id=system_id, energy_models=models, learned_systems=learned_systems,
                      learned_labels=learned_labels, data_ids=training_data_ids(r, upstream, models))
    # an active-learning round learns from its parent's RSS data (plus labels, charged by id): the parent's cost
    cost_ids = list(r.data_cost_ids) or data_cost_ids(store, scope, upstream, parent_cost_ids)
    res = train(store, cfg.model, tcfg, scope=scope, checkpoint_dir=checkpoint_dir(cfg), progress=progress,
                max_epochs=epochs, init_from=init_from)
    members = _train_committee(cfg, store, tcfg, scope, epochs=epochs, progress=progress,
                               init_committee=init_committee)
    sha = file_sha256(res.checkpoint)

    def record(trained: TrainingRun, member_tcfg: TrainConfig, **extra) -> ModelRecord:
        return ModelRecord(
            model_id=trained.model_id, checkpoint=str(trained.checkpoint),
            sha256=sha if trained is res else file_sha256(trained.checkpoint),
            study=cfg.name, system_id=system_id, energy_models=list(models), epochs=trained.epochs,
            best_val=trained.best_val, n_train=trained.n_train, n_val=trained.n_val,
            model=cfg.model.model_dump(mode="json"), train=member_tcfg.model_dump(mode="json"), round=round_index,
            learned_labels=list(learned_labels), pretrained=pretrained, data_cost_ids=cost_ids, **extra)

    main = record(res, cfg.train, committee=[m.model_id for m, _ in members])
    with model_registry(cfg) as registry:  # members first: a recorded model's committee is always there
        for member, member_tcfg in members:
            registry.record(record(member, member_tcfg, member_of=res.model_id))
        registry.record(main)
    validity, warning = sample_validity_check(cfg, str(res.checkpoint), n_train=res.n_train, device=tcfg.device)
    # the result is the registered model plus what only this run knows
    return TrainResult.from_record(
        main, run_id=run_id or new_run_id(), config_hash=cfg.section_hash("model", "train"),
        sample_validity=validity, warning=warning, samples_per_second=res.samples_per_second,
        resumed_from=res.resumed_from, training_doc_ids=res.doc_ids, history=res.history,
    )


def training_data_ids(r: ActiveLearningRound, upstream: RSSResult | None, models: tuple[str, ...]) -> tuple[str, ...]:
    """The training cell's documents a model learns from, by id: an active-learning round's chain keeps its
    first model's data; a model trained after the RSS stage learns from that stage's result. Without either
    (`surfdiff train` alone) or with data of several energy models (multi-fidelity, where the RSS result
    holds one of them), () : the study's documents of the cell (DataScope), as before."""
    if r.data_cost_ids:
        return tuple(r.data_cost_ids)
    if upstream is not None and len(models) == 1:
        return tuple(upstream.doc_ids)
    return ()


def data_cost_ids(store: ResultsStore, scope: DataScope, upstream: RSSResult | None,
                  parent: tuple[str, ...] = ()) -> list[str]:
    """What the training data of `scope` cost, by id, for the model's record: every oracle relaxation of the
    training cell it was chosen from (DataScope.cost_criteria: the dropped and failed ones too), every structure
    the RSS run `upstream` planned, and `parent`'s (a registered model it was fine-tuned from)."""
    found = {row["doc_id"] for row in store.find_raw(scope.cost_criteria(), properties=["doc_id"])}
    return sorted(found | set(upstream.doc_ids if upstream is not None else ()) | set(parent))


def initial_model(cfg: SurfdiffConfig) -> tuple[str, tuple[str, ...], str | None, tuple[str, ...]]:
    """`train.init_from`: a shipped pretrained model (registered in the study's registry on first use) or a
    registered model id. Its checkpoint, its committee's model ids, the shipped model it descends from and the
    ids of what its own training data cost (none for a shipped one: its card says what it cost)."""
    from surfdiff_core import pretrained

    name = cfg.train.init_from
    card = pretrained.find_shipped(name)
    if card is not None:
        rec = pretrained.register(card, cfg, for_training=True)
        return rec.checkpoint, tuple(rec.committee), card.name, ()
    with model_registry(cfg) as registry:
        rec = registry.get(name) if name else None
    if rec is None:
        shipped = ", ".join(c.name for c in pretrained.shipped_models()) or "none"
        raise SurfdiffError(f"train.init_from {name!r} is neither a shipped pretrained model ({shipped}) nor a "
                            f"model id in this study's registry (see `surfdiff models --config CONFIG`)")
    verify_checkpoint(rec)
    return rec.checkpoint, tuple(rec.committee), rec.pretrained, tuple(rec.data_cost_ids)


def committee_config(tcfg: TrainConfig, k: int) -> TrainConfig:
    """Member k (1..ensemble-1) of the committee: its own seed (initial weights, validation split, batches)
    and the MLFF loss alone, since only its energies and forces are used."""
    return tcfg.model_copy(update={"seed": tcfg.seed + k, "score_weight": 0.0, "ensemble": 1})


def _train_committee(cfg: SurfdiffConfig, store: ResultsStore, tcfg: TrainConfig, scope, *, epochs: int | None,
                     progress: bool, init_committee: tuple[str, ...]) -> list[tuple[TrainingRun, TrainConfig]]:
    from surfdiff_core.train.trainer import train

    inits: list[str | None] = [None] * (tcfg.ensemble - 1)
    if init_committee:  # fine-tuning: member k starts from the previous round's member k
        with model_registry(cfg) as registry:
            previous = [registry.get(mid) for mid in init_committee]
        for k, rec in enumerate(previous[: len(inits)]):
            if rec is None:
                raise SurfdiffError(f"committee member {init_committee[k]} is not in the model registry")
            inits[k] = rec.checkpoint
    members = []
    for k in range(1, tcfg.ensemble):
        member_tcfg = committee_config(tcfg, k)
        trained = train(store, cfg.model, member_tcfg, scope=scope, checkpoint_dir=checkpoint_dir(cfg),
                        progress=progress, max_epochs=epochs, init_from=inits[k - 1])
        members.append((trained, member_tcfg))
    return members
