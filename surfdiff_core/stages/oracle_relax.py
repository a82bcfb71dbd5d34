"""Oracle labels of generated samples: relaxations as RSS relaxes (the evaluation's generative arm and the labels
of active learning) and single points (the cheap labels of active learning)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.progress import progress_bar
from surfdiff_core.retry import attempt_meta, plan_work
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import RELAXED_BOX_TOLERANCE, SurfaceSystem


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
                      oracle=cfg.oracle.name, parent_id=cand.doc_id, **cand.model_dump(include={
                          "composition", "formula", "system_id", "element", "facet", "cell", "n_substrate",
                          "movable", "fixed", "z_box", "model_id", "seed"}))
        info = {**(meta or {}), "purpose": tag, "mlff_energy": cand.energy}
        if relax:
            info["relaxer"] = r.optimizer
        try:  # a single point is zero optimiser steps: one frame, with a relaxation's checks and errors
            res = relax_atoms(cand.to_atoms(), calculator, fmax=r.fmax, steps=r.steps if relax else 0,
                              optimizer=r.optimizer, trajectory_every=r.trajectory_every, fixed=cand.fixed)
        except Exception as exc:  # noqa: BLE001 - a failed label still cost oracle time, and is recorded
            error = f"{type(exc).__name__}: {exc}"[:500]
            store.put(StructureDoc(structure=cand.structure, valid=False, error=error,
                                   meta={**info, **attempt_meta(prior, error)}, **common))
            continue
        info.update(attempt_meta(prior, None))
        traj = res.trajectory
        store.put(StructureDoc(
            structure=atoms_to_structure_dict(res.atoms) if relax else cand.structure,
            initial_structure=cand.structure if relax else None, energy=float(res.energy),
            forces=np.round(res.forces, 6).tolist(), fmax=float(res.fmax), steps=int(res.steps),
            converged=bool(res.converged), wall_time=float(res.wall_time),
            in_box=bool(np.all(system.inside_box(res.atoms, tol=RELAXED_BOX_TOLERANCE))),
            oracle_settings=cfg.oracle.settings,
            meta=info, trajectory=frames_from_arrays([f["positions"] for f in traj], [f["energy"] for f in traj],
                                                     [f["forces"] for f in traj]),
            **common,
        ))
    by_id = {d.doc_id: d for d in store.find({"doc_id": {"$in": ids}})}
    return [by_id[i] for i in ids if i in by_id]
