"""Active learning: sample, label the best distinct samples with the oracle, fine-tune, and sample again.

Each round k: guided samples of every target with the current model (seeded by k), the best
`relax_per_round` distinct ones per target relaxed with the oracle as RSS relaxes (their relaxed structures
train the denoiser, their relaxation frames the MLFF), the next `single_points_per_round` given one oracle
energy+force call each (MLFF data only: the MLFF's own minima, corrected where it is wrong), then the model
fine-tuned from its own weights on RSS data plus every label so far. Rounds are recorded in the model
registry; every id is deterministic, so a killed loop resumes where it stopped, and the loop stops at its
relaxation budget.

The labels run here one after the other, or on an executor (local processes, the Slurm one of deploy/): one job
per label through `remote.run_on`, as the evaluation's relaxations. A lost job is in the round's `lost` (id ->
reason), never stored, and the round fine-tunes on the labels that came back; a rerun redoes only the lost ones
(same ids), and so trains the round's model on the full set.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.stages import sample, train
from surfdiff_core.stages.common import new_run_id, sample_targets, target_system
from surfdiff_core.stages.oracle_relax import relax_samples, single_points
from surfdiff_core.stages.results import StageResult, TrainResult
from surfdiff_core.store import ResultsStore, StructureDoc
from surfdiff_core.system import SurfaceSystem

if TYPE_CHECKING:
    from surfdiff_core.evaluate.references import PhaseReferences


@dataclass
class ActiveLearningResult(StageResult):
    model: TrainResult  # the model after the last round (the input model when no round ran)
    rounds: list[dict] = field(default_factory=list)  # per round: model, samples, labels, best labelled energy
    relaxations: int = 0  # oracle relaxations spent on labels (training-data cost, in the target cells)
    single_points: int = 0  # oracle single points spent on labels (one force call each)
    lost: dict[str, str] = field(default_factory=dict)  # label jobs lost on the executor (id -> reason), every round


def run_round(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, k: int, *, spent: int = 0,
              run_id: str, progress: bool = True, executor: Executor | None = None) -> tuple[TrainResult, dict]:
    """Round k from `model`: sample, label the best distinct samples (within the budget left after `spent`
    relaxations), fine-tune. Returns the new model and the round's record. `executor`: each label one job there
    (with the study's oracle); its lost jobs are the record's `lost`, not in the store."""
    from surfdiff_core.evaluate.matching import deduplicate
    from surfdiff_core.oracles import get_calculator

    al = cfg.active_learning
    targets = sample_targets(cfg)
    systems = {(s.composition, s.cell): s for s in (target_system(cfg, t) for t in targets)}
    left = None if al.max_relaxations is None else al.max_relaxations - spent
    calculator = get_calculator(cfg.oracle.name, **cfg.oracle.settings)
    scfg = cfg.sample.model_copy(update={"n": al.samples or cfg.sample.n, "seed": cfg.sample.seed + 7919 * k})
    drawn = sample.run(cfg, store, model, targets=targets, scfg=scfg, run_id=f"{run_id}-al{k}", progress=progress)
    labels, points, best, label_ids = 0, 0, {}, []
    lost: dict[str, str] = {}
    meta = {"active_learning": True, "round": k, "model_id": model.model_id}
    explored = explore_around_best(cfg, store, model, drawn.targets, scfg, run_id=f"{run_id}-al{k}-explore",
                                   progress=progress)
    candidates = [[d for d in store.find({"doc_id": {"$in": [*t.doc_ids, *extra]}})
                   if d.valid and d.in_box and d.energy] for t, extra in zip(drawn.targets, explored, strict=True)]
    total = al.relax_per_round * len(drawn.targets)
    total = total if left is None else max(0, min(total, left))
    chosen = [systems[(t.composition, t.cell)] for t in drawn.targets]
    quotas, excess = round_quotas(cfg, store, model, chosen, candidates, total, calculator)
    for t, system, docs, quota in zip(drawn.targets, chosen, candidates, quotas, strict=True):
        if not quota and not al.single_points_per_round:
            continue
        ranked = deduplicate(docs, k=quota + al.single_points_per_round)
        relaxed = relax_samples(cfg, store, system, ranked[:quota], calculator,
                                tag=f"active-learning-{k}", meta=meta, progress=progress, executor=executor,
                                lost=lost)
        # the next best distinct samples: where the MLFF put minima that no relaxation checks this round
        pointed = single_points(cfg, store, system, ranked[quota:], calculator,
                                tag=f"active-learning-{k}", meta=meta, progress=progress, executor=executor,
                                lost=lost)
        labels += len(relaxed)
        points += len(pointed)
        label_ids += [d.doc_id for d in relaxed + pointed]
        energies = [d.energy for d in relaxed if d.energy is not None and not d.error]
        best[f"{t.composition} {t.cell}"] = min(energies) if energies else None
    learned = tuple(sorted({s.system_id for s in systems.values()}))
    new = train.run(cfg, store, epochs=al.epochs, run_id=run_id, progress=progress,
                    round_of=train.ActiveLearningRound(index=k, learned_systems=learned,
                                                       learned_labels=(*model.learned_labels, *label_ids),
                                                       init_from=model.checkpoint,
                                                       init_committee=tuple(model.committee),
                                                       data_cost_ids=tuple(model.data_cost_ids)))
    keys = [f"{t.composition} {t.cell}" for t in drawn.targets]
    return new, {"round": k, "model_id": new.model_id, "samples": len(drawn.doc_ids),
                 "explored": sum(len(e) for e in explored), "labels": labels,
                 "single_points": points, "n_train": new.n_train, "best_labelled": best, "best_val": new.best_val,
                 "allocation": al.allocation, "quotas": dict(zip(keys, quotas, strict=True)),
                 "excess_eV": None if excess is None else dict(zip(keys, excess, strict=True)), "lost": lost}


def explore_around_best(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, targets: list, scfg, *,
                        run_id: str, progress: bool) -> list[list[str]]:
    """`active_learning.explore` samples per target seeded at its best oracle label of the chain so far (seeded
    exploration, sample.t0); the doc ids per target, empty where it has no label yet or exploring is off."""
    n = cfg.active_learning.explore
    out: list[list[str]] = [[] for _ in targets]
    if n <= 0 or not model.learned_labels:
        return out
    labels = [d for d in store.find({"doc_id": {"$in": list(model.learned_labels)}, "source": "relaxed"})
              if d.energy is not None and not d.error and d.in_box]
    for j, t in enumerate(targets):
        own = [d for d in labels if (d.composition, d.cell) == (t.composition, t.cell)]
        if not own:
            continue
        best = min(own, key=lambda d: d.energy)
        seeded = scfg.model_copy(update={"n": n, "seed_structure": best.doc_id, "share_batches": False,
                                         "novelty": 0.0, "inpaint": None})
        target = SampleTarget(cell=t.cell, composition=t.composition)
        drawn = sample.run(cfg, store, model, targets=[target], scfg=seeded, run_id=run_id, progress=progress)
        out[j] = list(drawn.doc_ids)
    return out


def round_quotas(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, systems: list[SurfaceSystem],
                 candidates: list[list[StructureDoc]], total: int,
                 calculator) -> tuple[list[int], list[float] | None]:
    """(relaxation labels per target, excess above the γ(Δμ) envelope in eV or None) for this round's `total`:
    `uniform`, or `envelope` (surfdiff_core.evaluate.allocation) from each target's best candidate so far, its
    lowest oracle label or its best sample's MLFF energy. Without the adsorbate in any target there is no
    phase diagram to decide, and the split is uniform."""
    from surfdiff_core.evaluate.allocation import envelope_quotas, uniform_quotas
    from surfdiff_core.evaluate.cost import can_hit
    from surfdiff_core.evaluate.phase import surface_area
    from surfdiff_core.evaluate.references import holds_adsorbate, phase_references

    if cfg.active_learning.allocation == "uniform" or not holds_adsorbate(cfg, [s.composition for s in systems]):
        return uniform_quotas(total, len(systems)), None
    refs = _REFERENCES.get(_references_key(cfg))
    refs = _REFERENCES[_references_key(cfg)] = phase_references(cfg, calculator, systems, known=refs)
    labels = [d for d in store.find({"doc_id": {"$in": list(model.learned_labels)}}) if can_hit(d)]
    lines, areas, sigmas = [], [], []
    for system, docs in zip(systems, candidates, strict=True):
        own = [d.energy for d in labels if d.system_id == system.system_id and d.composition == system.composition]
        sample = min(docs, key=lambda d: d.energy, default=None)
        energies = own + ([sample.energy] if sample is not None else [])
        if not energies:  # nothing valid to judge by: as far from the envelope as it gets (floor only)
            energies = [float("inf")]
        lines.append(refs.line(min(energies), system))
        areas.append(surface_area(system.template))
        spread = (sample.meta.get("mlff_energy_std") if sample is not None else None) or 0.0
        sigmas.append(max(float(spread), cfg.evaluate.tol))
    return envelope_quotas(total, lines, areas, sigmas, cfg.evaluate.dmu_range)


_REFERENCES: dict[tuple, PhaseReferences] = {}  # per study, energy model and settings: computed once per process


def _references_key(cfg: SurfdiffConfig) -> tuple:
    return cfg.name, cfg.oracle.energy_model, cfg.section_hash("substrate", "confinement", "rss", "evaluate")


def budget_left(cfg: SurfdiffConfig, spent: int) -> bool:
    limit = cfg.active_learning.max_relaxations
    return limit is None or spent < limit


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: TrainResult, *, run_id: str | None = None,
        progress: bool = True, executor: Executor | None = None) -> ActiveLearningResult:
    """Every round in turn, from the trained model `upstream`, until the rounds or the budget run out; the labels
    on `executor` when given (run_round)."""
    run_id = run_id or upstream.run_id or new_run_id()
    result = ActiveLearningResult(study=cfg.name, run_id=run_id, config_hash=cfg.section_hash("active_learning"),
                                  model=upstream)
    for k in range(1, cfg.active_learning.rounds + 1):
        if not budget_left(cfg, result.relaxations):
            break
        result.model, record = run_round(cfg, store, result.model, k, spent=result.relaxations, run_id=run_id,
                                         progress=progress, executor=executor)
        add_round(result, record)
    return result


def add_round(result: ActiveLearningResult, record: dict) -> None:
    """A finished round into the loop's result (here and in the Prefect flow, which runs each round as a task)."""
    result.rounds.append(record)
    result.relaxations += record["labels"]
    result.single_points += record["single_points"]
    result.lost.update(record["lost"])
