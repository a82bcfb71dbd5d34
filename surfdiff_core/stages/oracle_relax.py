"""Oracle labels of generated samples: relaxations as RSS relaxes (the evaluation's generative arm and the labels
of active learning) and single points (the cheap labels of active learning).

Here, one after the other with the caller's calculator; or, given an executor (local processes, the Slurm one of
deploy/), one job per candidate through `remote.run_on`, each building the study's oracle itself and returning its
document as plain JSON, which this process stores. A lost job is reported by its id, never stored: a rerun redoes
it (the ids are the same either way). Each candidate is claimed first (store/claims.py), as RSS and the relax
stage claim theirs: two evaluations on one store never label a candidate twice; one waits for the other's document.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Literal

from threadpoolctl import threadpool_limits

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.progress import progress_bar
from surfdiff_core.remote import run_on
from surfdiff_core.retry import PriorFailure, WorkPlan, attempt_meta, claimed_work, plan_work
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.claims import WorkQueue
from surfdiff_core.system import SurfaceSystem

Source = Literal["relaxed", "single_point"]


def relax_samples(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True,
                  executor: Executor | None = None, lost: dict[str, str] | None = None) -> list[StructureDoc]:
    """Each candidate relaxed with the oracle exactly as RSS relaxes (rss.fmax, rss.steps, rss.optimizer),
    into `relaxed` documents with frames (resumable: ids from the candidate, `tag` and the settings; a stored
    failure is retried up to rss.max_attempts times). `executor`: one job per candidate there, with the study's
    oracle (cfg.oracle; `calculator` unused); its lost jobs go to `lost` (id -> reason), not to the store."""
    return _label(cfg, store, system, candidates, calculator, "relaxed", tag=tag, meta=meta, progress=progress,
                  executor=executor, lost=lost)


def single_points(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True,
                  executor: Executor | None = None, lost: dict[str, str] | None = None) -> list[StructureDoc]:
    """One oracle energy+force evaluation of each candidate as it is: `single_point` documents with one frame
    and the unconstrained forces (resumable and retried like relax_samples; on `executor` like it too)."""
    return _label(cfg, store, system, candidates, calculator, "single_point", tag=tag, meta=meta,
                  progress=progress, executor=executor, lost=lost)


def label_one(cfg: SurfdiffConfig, system: SurfaceSystem, cand: StructureDoc, doc_id: str, source: Source,
              calculator, *, tag: str, meta: dict | None, prior: PriorFailure | None) -> StructureDoc:
    """The document of one candidate's label (an error is recorded in it, never raised)."""
    from surfdiff_core.relax.ase_relax import relax_atoms
    from surfdiff_core.relax.records import Relaxed, error_text, parent_fields, relaxation_record

    r = cfg.rss
    relax = source == "relaxed"
    common = dict(doc_id=doc_id, source=source, study=cfg.name, energy_model=cfg.oracle.energy_model,
                  oracle=cfg.oracle.name, **parent_fields(cand))
    info = {**(meta or {}), "purpose": tag, "mlff_energy": cand.energy}
    if relax:
        info["relaxer"] = r.optimizer
    try:  # a single point is zero optimiser steps: one frame, with a relaxation's checks and errors
        outcome: Relaxed | str = Relaxed.from_ase(relax_atoms(
            cand.to_atoms(), calculator, fmax=r.fmax, steps=r.steps if relax else 0, optimizer=r.optimizer,
            trajectory_every=r.trajectory_every, fixed=cand.fixed))
    except Exception as exc:  # noqa: BLE001 - a failed label still cost oracle time, and is recorded
        outcome = error_text(exc)
    failed = isinstance(outcome, str)
    info.update(attempt_meta(prior, outcome if failed else None))
    if not failed:  # failed labels have always been stored without the oracle's settings
        common["oracle_settings"] = cfg.oracle.settings
    return relaxation_record(outcome, cand.structure, box=(system.n_substrate, system.z_box),
                             in_place=not relax, keep_start=relax, meta=info, **common)


def label_remote(cfg: SurfdiffConfig, system: SurfaceSystem, cand: StructureDoc, doc_id: str, source: Source,
                 tag: str, meta: dict | None, prior: PriorFailure | None) -> dict:
    """What an executor runs (a worker process, a Slurm job): one label with the study's oracle, its document as
    plain JSON (as rss.relax_remote)."""
    from surfdiff_core.rss import worker_calculator

    calc = worker_calculator(cfg.oracle.name, cfg.oracle.settings)
    with threadpool_limits(1, user_api="blas"):
        return label_one(cfg, system, cand, doc_id, source, calc, tag=tag, meta=meta,
                         prior=prior).model_dump(mode="json")


def label_id(cfg: SurfdiffConfig, cand: StructureDoc, source: Source, tag: str) -> str:
    """The document id of a candidate's label: the same in every run with these settings (what makes it resumable)."""
    r = cfg.rss
    settings = (r.fmax, r.steps, r.optimizer) if source == "relaxed" else ()
    return make_doc_id(source, cand.doc_id, tag, cfg.oracle.energy_model, *settings)


def _label(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
           calculator, source: Source, *, tag: str, meta: dict | None, progress: bool,
           executor: Executor | None = None, lost: dict[str, str] | None = None) -> list[StructureDoc]:
    r = cfg.rss
    relax = source == "relaxed"
    ids = [label_id(cfg, c, source, tag) for c in candidates]
    work = plan_work(store, ids, r.max_attempts)
    label = f"{tag}: {'relax' if relax else 'single points'} {system.composition} {system.cell}"
    todo = {doc_id: cand for cand, doc_id in zip(candidates, ids, strict=True) if doc_id not in work.finished}
    if todo:
        with progress_bar(total=len(todo), desc=label, disable=not progress, unit="struct",
                          dynamic_ncols=True) as bar, \
                claimed_work(store, list(todo), work, r.max_attempts, on_elsewhere=lambda _: bar.update(1)) as queue:
            if executor is not None:
                _label_on(executor, cfg, store, system, todo, queue, work, source, bar, tag=tag, meta=meta,
                          lost=lost)
            else:  # one after the other, in the candidates' order, each as this process claims it
                while (doc_id := queue.next()) is not None:
                    store.put(label_one(cfg, system, todo[doc_id], doc_id, source, calculator, tag=tag, meta=meta,
                                        prior=work.retry.get(doc_id)))
                    queue.done(doc_id)
                    bar.update(1)
    by_id_doc = {d.doc_id: d for d in store.find({"doc_id": {"$in": ids}})}
    return [by_id_doc[i] for i in ids if i in by_id_doc]


def _label_on(executor: Executor, cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem,
              todo: dict[str, StructureDoc], queue: WorkQueue, work: WorkPlan, source: Source, bar, *, tag: str,
              meta: dict | None, lost: dict[str, str] | None) -> None:
    """The candidates of `todo`, one job each on `executor` as this process claims them, all at once (as the
    RSS and relax stages do); each document stored here as its job returns."""
    def job(doc_id: str) -> tuple[Callable[..., dict], tuple]:
        return label_remote, (cfg, system, todo[doc_id], doc_id, source, tag, meta, work.retry.get(doc_id))

    def finished(_: str, data: dict) -> None:
        store.put(StructureDoc.model_validate(data))
        bar.update(1)

    def gone(doc_id: str, why: str) -> None:
        if lost is not None:
            lost[doc_id] = why
        bar.update(1)

    run_on(executor, queue, len(todo), job, finished, gone)
