"""Oracle labels of generated samples: relaxations as RSS relaxes (the evaluation's generative arm and the labels
of active learning) and single points (the cheap labels of active learning)."""

from __future__ import annotations

from typing import Literal

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.progress import progress_bar
from surfdiff_core.retry import attempt_meta, plan_work
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.system import SurfaceSystem


def relax_samples(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True) -> list[StructureDoc]:
    """Each candidate relaxed with the oracle exactly as RSS relaxes (rss.fmax, rss.steps, rss.optimizer),
    into `relaxed` documents with frames (resumable: ids from the candidate, `tag` and the settings; a stored
    failure is retried up to rss.max_attempts times)."""
    return _label(cfg, store, system, candidates, calculator, "relaxed", tag=tag, meta=meta, progress=progress)


def single_points(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True) -> list[StructureDoc]:
    """One oracle energy+force evaluation of each candidate as it is: `single_point` documents with one frame
    and the unconstrained forces (resumable and retried like relax_samples)."""
    return _label(cfg, store, system, candidates, calculator, "single_point", tag=tag, meta=meta,
                  progress=progress)


def _label(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
           calculator, source: Literal["relaxed", "single_point"], *, tag: str, meta: dict | None,
           progress: bool) -> list[StructureDoc]:
    from surfdiff_core.relax.ase_relax import relax_atoms
    from surfdiff_core.relax.records import Relaxed, error_text, parent_fields, relaxation_record

    r = cfg.rss
    relax = source == "relaxed"
    settings = (r.fmax, r.steps, r.optimizer) if relax else ()
    ids = [make_doc_id(source, c.doc_id, tag, cfg.oracle.energy_model, *settings) for c in candidates]
    work = plan_work(store, ids, r.max_attempts)
    label = f"{tag}: {'relax' if relax else 'single points'} {system.composition} {system.cell}"
    for cand, doc_id in progress_bar(list(zip(candidates, ids, strict=True)), desc=label,
                                     disable=not progress, unit="struct", dynamic_ncols=True):
        if doc_id in work.finished:
            continue
        prior = work.retry.get(doc_id)
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
        store.put(relaxation_record(outcome, cand.structure, box=(system.n_substrate, system.z_box),
                                    in_place=not relax, keep_start=relax, meta=info, **common))
    by_id = {d.doc_id: d for d in store.find({"doc_id": {"$in": ids}})}
    return [by_id[i] for i in ids if i in by_id]
