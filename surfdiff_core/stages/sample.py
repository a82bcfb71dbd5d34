"""Sampling stage: guided generation for every (cell, composition) target with one registered model."""

from __future__ import annotations

from surfdiff_core.config import SampleConfig, SampleTarget, SurfdiffConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages.common import (
    model_registry,
    new_run_id,
    sample_targets,
    target_system,
    training_energy_models,
    training_system,
)
from surfdiff_core.stages.results import SampleResult, TargetSamples, TrainResult
from surfdiff_core.store import ResultsStore
from surfdiff_core.store.models import ModelRecord, verify_checkpoint


def resolve_model(cfg: SurfdiffConfig, upstream: TrainResult | None = None,
                  model_id: str | None = None) -> ModelRecord:
    """The model to sample with: the training stage's result, a named model, or the newest one registered for
    this study's training system and energy model. Its checkpoint must match the record. A shipped pretrained
    model's name (or id) works as a model id: it is registered on first use."""
    if upstream is None and model_id:
        model_id = shipped_model_id(cfg, model_id)
    with model_registry(cfg) as registry:
        if upstream is not None:
            rec = registry.get(upstream.model_id)
            if rec is None:  # a result handed over without a registry entry: trust its own hash
                rec = upstream.to_record()
            verify_checkpoint(rec)
            return rec
        return registry.resolve(study=cfg.name, system_id=training_system(cfg).system_id,
                                energy_model=training_energy_models(cfg)[0], model_id=model_id)


def shipped_model_id(cfg: SurfdiffConfig, name_or_id: str) -> str:
    """The model id for a registered id as it is; for a shipped model's name, its id once registered here."""
    from surfdiff_core import pretrained

    with model_registry(cfg) as registry:
        if registry.get(name_or_id) is not None:
            return name_or_id
    card = pretrained.find_shipped(name_or_id)
    return pretrained.register(card, cfg).model_id if card is not None else name_or_id


def registered_model(cfg: SurfdiffConfig, run_id: str, model_id: str | None = None) -> TrainResult:
    """A registered model (named, or the study's newest) as the training stage's result, for stages that take
    one as upstream when no training ran in this run."""
    return TrainResult.from_record(resolve_model(cfg, model_id=model_id), study=cfg.name, run_id=run_id,
                                   config_hash="")


def committee_records(cfg: SurfdiffConfig, model: ModelRecord) -> list[ModelRecord]:
    """The MLFF-only members registered beside `model`, their checkpoints verified."""
    members = []
    with model_registry(cfg) as registry:
        for member_id in model.committee:
            rec = registry.get(member_id)
            if rec is None:
                raise SurfdiffError(f"committee member {member_id} of model {model.model_id} is not in the model "
                                    f"registry (retrain with `surfdiff train`)")
            verify_checkpoint(rec)
            members.append(rec)
    return members


def sample_one(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, model: ModelRecord, *,
               scfg: SampleConfig | None = None, run_id: str, progress: bool = True,
               device: str | None = None) -> TargetSamples:
    from surfdiff_core.sample.generate import sample_into_store
    from surfdiff_core.train.checkpoint import load_checkpoint
    from surfdiff_core.train.trainer import pick_device

    scfg = scfg or cfg.sample
    dev = pick_device(device or scfg.device)
    loaded = load_checkpoint(model.checkpoint, device=dev)
    committee = [load_checkpoint(rec.checkpoint, device=dev) for rec in committee_records(cfg, model)]
    system = target_system(cfg, target)
    reused = _reused_batches(store, loaded.model_id, system, scfg, [m.model_id for m in committee])
    res, docs = sample_into_store(store, loaded, system, scfg, device=dev, run_id=run_id,
                                  checkpoint=model.checkpoint, progress=progress, study=cfg.name,
                                  committee=committee)
    reused_ids = {i for batch in reused for i in batch}
    valid = [d for d in docs if d.valid and d.in_box and d.energy is not None]
    wall = res.wall_time if res else 0.0
    return TargetSamples(
        cell=system.cell, composition=system.composition, system_id=system.system_id, n=len(docs),
        n_valid=len(valid), rejection_rate=1 - len(valid) / len(docs) if docs else 0.0,
        best_energy=min((d.energy for d in valid), default=None), wall_time=wall,
        structure_steps_per_second=(res.structure_steps / wall) if res and wall > 0 else 0.0,
        doc_ids=[d.doc_id for d in docs], batches=-(-scfg.n // scfg.batch_size), reused_batches=len(reused),
        reused_runs=sorted({d.run_id for d in docs if d.doc_id in reused_ids and d.run_id}),
    )


def sample_targets_shared(cfg: SurfdiffConfig, store: ResultsStore, targets: list[SampleTarget], model: ModelRecord,
                          *, scfg: SampleConfig, run_id: str, progress: bool = True,
                          device: str | None = None) -> list[TargetSamples]:
    """Every target through one stream of shared batches (sample.share_batches, surfdiff_core/sample/shared.py)."""
    from surfdiff_core.sample.shared import sample_shared
    from surfdiff_core.train.checkpoint import load_checkpoint
    from surfdiff_core.train.trainer import pick_device

    dev = pick_device(device or scfg.device)
    loaded = load_checkpoint(model.checkpoint, device=dev)
    committee = [load_checkpoint(rec.checkpoint, device=dev) for rec in committee_records(cfg, model)]
    systems = [target_system(cfg, t) for t in targets]
    per_target, ran = sample_shared(store, loaded, systems, scfg, device=dev, run_id=run_id,
                                    checkpoint=model.checkpoint, progress=progress, study=cfg.name,
                                    committee=committee)
    out = []
    for t, (system, docs) in enumerate(zip(systems, per_target, strict=True)):
        valid = [d for d in docs if d.valid and d.in_box and d.energy is not None]
        wall = ran["wall_time"]
        out.append(TargetSamples(
            cell=system.cell, composition=system.composition, system_id=system.system_id, n=len(docs),
            n_valid=len(valid), rejection_rate=1 - len(valid) / len(docs) if docs else 0.0,
            best_energy=min((d.energy for d in valid), default=None), wall_time=wall,
            structure_steps_per_second=ran["structure_steps"] / wall if wall > 0 else 0.0,
            doc_ids=[d.doc_id for d in docs], batches=ran["batches"][t], reused_batches=ran["reused_batches"][t],
            reused_runs=sorted({d.run_id for d in docs if d.run_id and d.run_id != run_id})))
    return out


def _reused_batches(store: ResultsStore, model_id: str, system, scfg: SampleConfig,
                    committee: list[str]) -> list[list[str]]:
    """The doc ids of the batches already complete in the store: the ones sample_into_store will not generate
    again (same ids and batch rule as it uses), so a resumed run can say what it reused."""
    from surfdiff_core.sample.generate import generated_doc_id

    ids = [generated_doc_id(model_id, system, scfg, scfg.seed, i, committee) for i in range(scfg.n)]
    have = store.existing_ids(ids)
    bs = scfg.batch_size
    batches = [ids[k : k + bs] for k in range(0, len(ids), bs)]
    return [b for b in batches if all(i in have for i in b)]


def check_conditioning(cfg: SurfdiffConfig, store: ResultsStore, targets: list[SampleTarget],
                       scfg: SampleConfig) -> None:
    """Resolve sample.inpaint / seed_structure for every target before any is sampled: a bad source or selection
    is one line (ConfigError) instead of a failure after the first targets were written."""
    if scfg.inpaint is None and scfg.seed_structure is None:
        return
    from surfdiff_core.sample.conditioning import resolve_conditioning

    for target in targets:
        resolve_conditioning(scfg, target_system(cfg, target), store)


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: TrainResult | None = None, *,
        targets: list[SampleTarget] | None = None, scfg: SampleConfig | None = None, model_id: str | None = None,
        run_id: str | None = None, progress: bool = True, device: str | None = None) -> SampleResult:
    model = resolve_model(cfg, upstream, model_id)
    run_id = run_id or new_run_id()
    scfg = scfg or cfg.sample
    result = SampleResult(study=cfg.name, run_id=run_id, config_hash=cfg.section_hash("sample"),
                          model_id=model.model_id, checkpoint=model.checkpoint)
    targets = targets or sample_targets(cfg)
    check_conditioning(cfg, store, targets, scfg)
    if scfg.share_batches:
        result.targets = sample_targets_shared(cfg, store, targets, model, scfg=scfg, run_id=run_id,
                                               progress=progress, device=device)
        return result
    for target in targets:
        result.targets.append(sample_one(cfg, store, target, model, scfg=scfg, run_id=run_id, progress=progress,
                                         device=device))
    return result
