"""Oracle relaxation of generated samples, as RSS relaxes: the evaluation's generative arm and the labels of
active learning; and oracle single points of samples, the cheap labels of active learning."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.retry import attempt_meta, plan_work
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import SurfaceSystem


def _inherited(cand: StructureDoc) -> dict:
    """What a label document keeps of the sample it was made from."""
    return cand.model_dump(include={"composition", "formula", "system_id", "element", "facet", "cell",
                                    "n_substrate", "movable", "fixed", "z_box", "model_id", "seed"})


def _stored(store: ResultsStore, ids: list[str]) -> list[StructureDoc]:
    """The stored documents of `ids`, in that order (those never written left out)."""
    by_id = {d.doc_id: d for d in store.find({"doc_id": {"$in": ids}})}
    return [by_id[i] for i in ids if i in by_id]


def relax_samples(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True) -> list[StructureDoc]:
    """Each candidate relaxed with the oracle exactly as RSS relaxes (rss.fmax, rss.steps, rss.optimizer),
    into `relaxed` documents with frames (resumable: ids from the candidate, `tag` and the settings; a stored
    failure is retried up to rss.max_attempts times)."""
    from surfdiff_core.relax.ase_relax import relax_atoms

    r = cfg.rss
    ids = [make_doc_id("relaxed", c.doc_id, tag, cfg.oracle.energy_model, r.fmax, r.steps, r.optimizer)
           for c in candidates]
    work = plan_work(store, ids, r.max_attempts)
    label = f"{tag}: relax {system.composition} {system.cell}"
    for cand, doc_id in tqdm(list(zip(candidates, ids, strict=True)), desc=label,
                             disable=not progress, unit="struct", dynamic_ncols=True):
        if doc_id in work.finished:
            continue
        prior = work.retry.get(doc_id)
        base = _inherited(cand)
        info = {**(meta or {}), "purpose": tag, "mlff_energy": cand.energy, "relaxer": r.optimizer}
        try:
            res = relax_atoms(cand.to_atoms(), calculator, fmax=r.fmax, steps=r.steps, optimizer=r.optimizer,
                              trajectory_every=r.trajectory_every, fixed=cand.fixed)
        except Exception as exc:  # noqa: BLE001 - a failed relaxation still cost one, and is recorded
            error = f"{type(exc).__name__}: {exc}"[:500]
            store.put(StructureDoc(doc_id=doc_id, source="relaxed", study=cfg.name,
                                   energy_model=cfg.oracle.energy_model, structure=cand.structure, valid=False,
                                   error=error, oracle=cfg.oracle.name, parent_id=cand.doc_id,
                                   meta={**info, **attempt_meta(prior, error)}, **base))
            continue
        info.update(attempt_meta(prior, None))
        in_box = bool(np.all(system.inside_box(res.atoms, tol=0.05)))
        traj = res.trajectory
        store.put(StructureDoc(
            doc_id=doc_id, source="relaxed", study=cfg.name, energy_model=cfg.oracle.energy_model,
            structure=atoms_to_structure_dict(res.atoms), initial_structure=cand.structure, energy=float(res.energy),
            forces=np.round(res.forces, 6).tolist(), fmax=float(res.fmax), steps=int(res.steps),
            converged=bool(res.converged), wall_time=float(res.wall_time), in_box=in_box, oracle=cfg.oracle.name,
            oracle_settings=cfg.oracle.settings, parent_id=cand.doc_id, meta=info,
            trajectory=frames_from_arrays([f["positions"] for f in traj], [f["energy"] for f in traj],
                                          [f["forces"] for f in traj]),
            **base,
        ))
    return _stored(store, ids)


def single_points(cfg: SurfdiffConfig, store: ResultsStore, system: SurfaceSystem, candidates: list[StructureDoc],
                  calculator, *, tag: str, meta: dict | None = None, progress: bool = True) -> list[StructureDoc]:
    """One oracle energy+force evaluation of each candidate as it is (one frame, `single_point` documents with
    the unconstrained forces; resumable like relax_samples). A failed call is recorded, never raised."""
    from surfdiff_core.relax.ase_relax import relax_atoms

    ids = [make_doc_id("single_point", c.doc_id, tag, cfg.oracle.energy_model) for c in candidates]
    work = plan_work(store, ids, cfg.rss.max_attempts)
    label = f"{tag}: single points {system.composition} {system.cell}"
    for cand, doc_id in tqdm(list(zip(candidates, ids, strict=True)), desc=label,
                             disable=not progress, unit="struct", dynamic_ncols=True):
        if doc_id in work.finished:
            continue
        prior = work.retry.get(doc_id)
        base = _inherited(cand)
        info = {**(meta or {}), "purpose": tag, "mlff_energy": cand.energy}
        common = dict(doc_id=doc_id, source="single_point", study=cfg.name, energy_model=cfg.oracle.energy_model,
                      structure=cand.structure, oracle=cfg.oracle.name, oracle_settings=cfg.oracle.settings,
                      parent_id=cand.doc_id, **base)
        try:  # zero optimiser steps: the one frame, with the checks and error text of a relaxation
            res = relax_atoms(cand.to_atoms(), calculator, steps=0, fixed=cand.fixed)
        except Exception as exc:  # noqa: BLE001 - a failed call is recorded and retried on the next run
            error = f"{type(exc).__name__}: {exc}"[:500]
            store.put(StructureDoc(valid=False, error=error, meta={**info, **attempt_meta(prior, error)}, **common))
            continue
        info.update(attempt_meta(prior, None))
        frame = res.trajectory[-1]
        store.put(StructureDoc(
            energy=float(res.energy), forces=np.round(res.forces, 6).tolist(), fmax=float(res.fmax), steps=0,
            converged=bool(res.converged), wall_time=float(res.wall_time),
            in_box=bool(np.all(system.inside_box(cand.to_atoms(), tol=0.05))), meta=info,
            trajectory=frames_from_arrays([frame["positions"]], [frame["energy"]], [frame["forces"]]), **common,
        ))
    return _stored(store, ids)
