"""Evaluation stage: how much cheaper the generative arm finds low-energy structures than RSS.

Per target (cell, composition), both arms are relaxed with the study's oracle and the RSS relaxer settings
(`rss.fmax`, `rss.steps`, `rss.optimizer`), so only the starting structures differ:
- generative arm: the best `evaluate.budget` distinct samples in MLFF rank order, after the active-learning
  labels of that cell when the model learned from some (they were oracle relaxations in the cell too);
- RSS arm: `evaluate.rss_budget` random structures relaxed directly in the target cell: the baseline stage's
  documents (surfdiff_core.stages.baseline), read by the ids of its result when one is passed, else the stage
  is run here, target by target.
On an executor (`run(..., executor=)`: local processes, the Slurm one of deploy/) both arms' oracle relaxations
run there, one job per structure; a lost job is reported by its id (`TargetEvaluation.lost`), never stored, and
a rerun redoes it. Without one, they run here (the RSS arm in rss.workers processes).
The per-target budget counts oracle relaxations in the target cell; beside it, the same in force calls
(atom-weighted: calls × atoms), and the all-in ratios that charge the training data and every active-learning
call (surfdiff_core.evaluate.cost). In both arms a relaxation that failed or left the box cannot be a hit but
is counted as spent.
Also: validity, uniqueness and novelty of the samples, relaxation steps, a known reference's rank, and the
γ(Δμ) phase diagram of the best structure of every composition and cell.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.errors import ConfigError, SurfdiffError
from surfdiff_core.stages import baseline as baseline_stage
from surfdiff_core.stages.common import (
    new_run_id,
    sample_targets,
    target_system,
    training_energy_models,
    training_system,
)
from surfdiff_core.stages.evaluate_report import (
    EvaluationResult,
    TargetEvaluation,
    phase_lines_for,
    phase_rows,
    write_figures,
)
from surfdiff_core.stages.oracle_relax import relax_samples
from surfdiff_core.stages.relax_reuse import check_relax_result, relaxer_mismatch, reusable_relaxations
from surfdiff_core.stages.results import BaselineResult, RelaxResult, SampleResult
from surfdiff_core.store import ResultsStore, StructureDoc
from surfdiff_core.store.models import ModelRecord
from surfdiff_core.system import SurfaceSystem
from surfdiff_core.train.data import DataScope


def target_key(target: SampleTarget | TargetEvaluation, system: SurfaceSystem | None = None) -> str:
    cell = system.cell if system is not None else target.cell
    return f"{target.composition} {cell}"


def generated_docs(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, upstream: SampleResult | None,
                   model_id: str, sample_run: str | None = None, committee: tuple[str, ...] = ()) -> list[StructureDoc]:
    """The samples being judged: the sample stage's documents; without it, the model's samples of one named
    sample run, or else those the config's sample section makes, or else (a `surfdiff sample` with other
    options) the model's newest sample run. Never every sample the model ever drew: active-learning rounds
    and other settings sample with the same model."""
    from surfdiff_core.sample.generate import generated_doc_id

    crit: dict = {"source": "generated", "study": cfg.name, "system_id": system.system_id,
                  "composition": system.composition, "model_id": model_id}
    if upstream is not None:
        return list(store.find({**crit, "doc_id": {"$in": upstream.doc_ids}}))
    if sample_run is not None:
        return list(store.find({**crit, "run_id": sample_run}))
    scfg = cfg.sample
    ids = [generated_doc_id(model_id, system, scfg, scfg.seed, i, committee) for i in range(scfg.n)]
    docs = list(store.find({**crit, "doc_id": {"$in": ids}}))
    if docs:
        return docs
    latest: dict[str | None, str] = {}
    for row in store.find_raw(crit, properties=["run_id", "created_at"]):
        run, at = row.get("run_id"), str(row.get("created_at") or "")
        latest[run] = max(latest.get(run, at), at)
    if not latest:
        return []
    return list(store.find({**crit, "run_id": max(latest, key=lambda r: latest[r])}))


def _rss_arm(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, system: SurfaceSystem,
            baseline: BaselineResult | None, progress: bool, executor: Executor | None = None,
            lost: dict[str, str] | None = None) -> list[StructureDoc]:
    """The RSS arm of one target: by the ids of the baseline stage's result, or (none passed) the baseline stage
    run for this target now (on `executor` when given); the arm's lost jobs go to `lost`."""
    if baseline is None:
        baseline = baseline_stage.run(cfg, store, [target], progress=progress, executor=executor)
    for t in baseline.targets:
        if lost is not None and (t.system_id, t.composition) == (system.system_id, system.composition):
            lost.update(t.lost)
    return baseline_stage.arm_documents(store, baseline_stage.arm_ids(baseline, system.system_id,
                                                                      system.composition))


def _reference_rank(cfg: SurfdiffConfig, key: str, relaxed: list[StructureDoc]) -> int | None:
    from ase.io import read

    from surfdiff_core.evaluate.matching import find_reference

    path = cfg.evaluate.references.get(key)
    if not path:
        return None
    try:
        ref = read(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise ConfigError(f"evaluate.references[{key!r}]: cannot read {path}: {exc}") from None
    found = [d for d in sorted(relaxed, key=lambda d: d.energy) if d.energy is not None]
    return find_reference(found, ref)


def _active_learning_in(training_docs: list[StructureDoc], system: SurfaceSystem) -> list[StructureDoc]:
    """This target's active-learning labels and single points (its cell and composition), in spent order."""
    from surfdiff_core.evaluate.cost import spent_order

    return spent_order(d for d in training_docs if d.meta.get("active_learning")
                       and d.system_id == system.system_id and d.composition == system.composition)


def evaluate_target(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, upstream: SampleResult | None,
                    model_id: str, calculator, training_docs: list[StructureDoc], progress: bool,
                    sample_run: str | None = None, committee: tuple[str, ...] = (),
                    baseline: BaselineResult | None = None, executor: Executor | None = None,
                    relax_result: RelaxResult | None = None) -> TargetEvaluation:
    """One target's evaluation. `relax_result`: the relax stage's result whose relaxations are the evaluation's
    own (check_relax_result and relaxer_mismatch passed): the candidates it relaxed are not relaxed again."""
    from surfdiff_core.evaluate.budget import (
        committee_calibration,
        hit_energy,
        labelled_energies,
        mlff_rank_correlation,
        mlff_ranking_warning,
        ranked_relaxations,
        single_point_charge,
        speedup,
        steps_summary,
    )
    from surfdiff_core.evaluate.cost import can_hit, target_cost
    from surfdiff_core.evaluate.matching import deduplicate, novel_mask, novelty
    from surfdiff_core.evaluate.validity import validity_counts

    system = target_system(cfg, target)
    key = target_key(target, system)
    tol = cfg.evaluate.tol
    docs = generated_docs(cfg, store, system, upstream, model_id, sample_run, committee)
    if not docs:
        which = f"sample run {sample_run!r}" if sample_run else "the config's sample settings"
        raise SurfdiffError(f"no generated structures of {key} from model {model_id} and {which} in study "
                            f"{cfg.name!r} (run `surfdiff sample` with them, or name a sample run)")
    counts = validity_counts(docs)[(system.system_id, system.composition)]
    valid = sorted((d for d in docs if d.valid and d.in_box and d.energy is not None),
                   key=lambda d: (d.energy, d.doc_id))
    distinct = deduplicate(valid)
    # Active-learning labels in this cell were oracle calls too: the arm spent them first, round by round
    # (each round's relaxations, then its single points), and a sample that is one of those structures again
    # would only repeat its relaxation.
    in_cell = _active_learning_in(training_docs, system)
    labels = [d for d in in_cell if d.source != "single_point"]
    points = len(in_cell) - len(labels)
    fresh = distinct
    if labels:
        fresh = [d for d, new in zip(distinct, novel_mask(distinct, labels), strict=True) if new]
    lost: dict[str, str] = {}
    chosen = fresh[: cfg.evaluate.budget]
    reused = reusable_relaxations(store, relax_result, chosen) if relax_result is not None else {}
    own = relax_samples(cfg, store, system, [c for c in chosen if c.doc_id not in reused], calculator,
                        tag="evaluate", progress=progress, executor=executor, lost=lost)
    child = {**{d.parent_id: d for d in own}, **reused}
    relaxed = [child[c.doc_id] for c in chosen if c.doc_id in child]  # in MLFF rank order, as relax_samples gives
    ranked = ranked_relaxations(fresh, relaxed)
    rss_all = _rss_arm(cfg, store, target, system, baseline, progress, executor, lost)
    # Both arms alike: a relaxation that failed or left the box is no minimum, but it was spent (NaN entries).
    rss_docs = [d for d in rss_all if can_hit(d)]
    rss_lost = [d for d in rss_all if not can_hit(d)]
    rss_energies = [d.energy for d in rss_docs]
    # Single points are charged as the relaxations their force calls would buy (an RSS relaxation's mean here)
    per_relaxation = rss_docs or [d for d in relaxed if not d.error]
    charged = single_point_charge(points, per_relaxation)
    gen_ranked = np.concatenate([labelled_energies(in_cell, per_relaxation), [hit_energy(d) for d in ranked]])
    sp = (speedup([hit_energy(d) for d in rss_all], gen_ranked, tol=tol)
          if rss_energies and len(gen_ranked) else None)
    cost = target_cost(rss_all, in_cell, ranked, tol)
    same_cell = [d for d in training_docs if d.cell == system.cell and d.composition == system.composition]
    return TargetEvaluation(
        cell=system.cell, composition=system.composition, system_id=system.system_id, validity=counts.__dict__,
        n_valid=len(valid), n_distinct=len(distinct), uniqueness=len(distinct) / len(valid) if valid else 0.0,
        novelty=novelty(distinct, same_cell) if same_cell else None,
        generative_energies=[float(e) for e in gen_ranked], rss_energies=[float(e) for e in rss_energies],
        speedup=None if sp is None else sp.__dict__,
        steps_generative=steps_summary([d for d in relaxed if not d.error]), steps_rss=steps_summary(rss_docs),
        reference_rank=_reference_rank(cfg, key, relaxed), active_learning_labels=len(labels),
        active_learning_single_points=points, single_point_charge=charged,
        sample_runs=sorted({d.run_id or "" for d in docs}),
        mlff_rank_correlation=mlff_rank_correlation(fresh, relaxed),
        committee_calibration=committee_calibration(fresh, relaxed),
        ranking_warning=mlff_ranking_warning(fresh, relaxed),
        relaxed_ids=[d.doc_id for d in relaxed], rss_ids=[d.doc_id for d in rss_docs],
        rss_lost_ids=[d.doc_id for d in rss_lost],
        generative_lost=sum(not can_hit(d) for d in [*labels, *ranked]), cost=cost.as_dict(), lost=lost,
        relax_reused=len(reused),
    )


def model_training_docs(cfg: SurfdiffConfig, store: ResultsStore, record: ModelRecord) -> list[StructureDoc]:
    """What the model learned from, as oracle documents to charge: the relaxations its training data was chosen
    from, by the ids its record carries (ModelRecord.data_cost_ids), and the active-learning labels (in target
    cells) of its own chain of rounds, by id."""
    labels = {"meta.active_learning": True, "doc_id": {"$in": record.learned_labels}}
    if record.data_cost_ids:
        return list(store.find({"$or": [{"doc_id": {"$in": record.data_cost_ids}}, labels]}))
    # Legacy path, for a record made before it kept data_cost_ids: the study's RSS data of the training cell by
    # scope (which also finds whatever that cell gained after training)
    scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id,
                      energy_models=tuple(training_energy_models(cfg)))
    docs = list(store.find(scope.cost_criteria()))
    if record.learned_labels:
        seen = {d.doc_id for d in docs}
        docs += [d for d in store.find({**labels, "study": cfg.name}) if d.doc_id not in seen]
    return docs


def pretrained_training(name: str | None) -> tuple[dict[str, float] | None, dict | None]:
    """The training-data cost of the shipped model a model descends from, and what the report says of it."""
    from surfdiff_core import pretrained

    card = pretrained.find_shipped(name)
    if card is None:
        return None, None
    cost = pretrained.training_cost(card)
    return cost, {"name": card.name, "structures": card.training_data.get("structures"), **cost}


def all_in_cost(training_docs: list[StructureDoc], targets: list[TargetEvaluation],
                pretrained_cost: dict[str, float] | None = None) -> dict:
    """The all-in comparison (see surfdiff_core.evaluate.cost.all_in): the training data is every oracle
    relaxation of the training cell this model's data came from, lost ones included (they cost calls too),
    but not the evaluation's own documents (a target in the training cell) nor active-learning labels, which
    are the other shared part. A shipped pretrained model the study fine-tuned or sampled with is charged its
    whole training data (`pretrained_cost`): made once, but made. Sets each target's one-target all-in ratio."""
    from surfdiff_core.evaluate.cost import ZERO, OracleCost, TargetCost, all_in, total_cost

    evaluation = {i for t in targets for i in (*t.relaxed_ids, *t.rss_ids, *t.rss_lost_ids)}
    learning = [d for d in training_docs if d.meta.get("active_learning")]
    training = [d for d in training_docs if not d.meta.get("active_learning") and d.doc_id not in evaluation]
    shipped = OracleCost.from_dict(pretrained_cost) or ZERO
    summary = all_in(total_cost(training) + shipped, total_cost(learning),
                     [TargetCost.from_dict(t.cost) for t in targets])
    for t, one in zip(targets, summary.one_target, strict=True):
        t.one_target_all_in = one
    return summary.as_dict()


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: SampleResult | None = None, *,
        baseline: BaselineResult | None = None, model_id: str | None = None,
        targets: list[SampleTarget] | None = None, run_id: str | None = None, sample_run: str | None = None,
        progress: bool = True, executor: Executor | None = None, relaxed: RelaxResult | None = None
        ) -> EvaluationResult:
    """The samples of `upstream` (or of the model's sample run, see generated_docs) against the RSS arm of
    `baseline` (the baseline stage's result; without it the stage runs here) in every target. `executor` (any
    concurrent.futures.Executor, e.g. the Slurm one of deploy/): the oracle relaxations of both arms as jobs
    there; None: here, as always. `relaxed` (the relax stage's result): the candidates it relaxed as the
    evaluation relaxes are not relaxed again (surfdiff_core.stages.relax_reuse); with other settings nothing is
    reused and the result says why (`relax_reuse_refused`)."""
    from surfdiff_core.evaluate.budget import training_cost
    from surfdiff_core.oracles import get_calculator, get_oracle_spec
    from surfdiff_core.stages.evaluate_report import phase_comparison_for
    from surfdiff_core.stages.sample import resolve_model

    if not get_oracle_spec(cfg.oracle.name).in_process:
        raise ConfigError(f"evaluation relaxes both arms with the oracle here: choose a local oracle (not "
                          f"{cfg.oracle.name})")
    record = resolve_model(cfg, model_id=upstream.model_id if upstream is not None else model_id)
    model = record.model_id
    if targets is None and upstream is not None:
        targets = [SampleTarget(cell=t.cell, composition=t.composition) for t in upstream.targets]
    targets = targets or sample_targets(cfg)
    if baseline is not None:  # before any work: a baseline of other settings or targets is refused
        baseline_stage.check_baseline(cfg, baseline, targets)
    reuse_refused = None
    if relaxed is not None:  # so is a relax result of another study or targets; other relaxer settings are noted
        check_relax_result(cfg, store, relaxed, targets)
        reuse_refused = relaxer_mismatch(cfg, relaxed)
    reuse = relaxed if relaxed is not None and reuse_refused is None else None
    training_docs = model_training_docs(cfg, store, record)
    shipped_cost, shipped = pretrained_training(record.pretrained)
    calculator = get_calculator(cfg.oracle.name, **cfg.oracle.settings)
    result = EvaluationResult(study=cfg.name, run_id=run_id or (upstream.run_id if upstream else new_run_id()),
                              config_hash=cfg.section_hash("evaluate", "rss", "oracle"), model_id=model,
                              energy_model=cfg.oracle.energy_model,
                              training_cost={**training_cost(training_docs).__dict__,
                                             "active_learning_labels": sum(
                                                 bool(d.meta.get("active_learning")) and d.source != "single_point"
                                                 for d in training_docs),
                                             "active_learning_single_points": sum(
                                                 d.source == "single_point" for d in training_docs),
                                             "pretrained": shipped})
    for t in targets:
        result.targets.append(evaluate_target(cfg, store, t, upstream, model, calculator, training_docs, progress,
                                              sample_run, tuple(record.committee), baseline, executor, reuse))
    result.relax_reused = sum(t.relax_reused for t in result.targets)
    result.relax_reuse_refused = reuse_refused
    result.all_in = all_in_cost(training_docs, result.targets, shipped_cost)
    lines = phase_lines_for(cfg, store, result, calculator)
    result.phase_diagram = phase_rows(lines, cfg.evaluate.dmu_range)
    # each arm's own envelope, RSS at the generative arm's total all-in budget, against the reference
    result.phase_comparison = phase_comparison_for(cfg, store, result, lines)
    result.figures = write_figures(cfg, result, lines)
    return result
