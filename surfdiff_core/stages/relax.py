"""Relax the best K generated candidates per (system, composition) with an oracle or DFT through jobflow.

Candidates are already MLFF-relaxed by the sampler; here they go through atomate2 makers (EMT, CHGNet,
SevenNet, GPAW locally; VASP under custodian on HPC) with the bottom substrate layers fixed via selective
dynamics. Results are `relaxed` (oracle) or `dft` (GPAW/VASP) documents whose parent is the generated one;
failed jobs are recorded with their error. Ids are deterministic, so a rerun skips finished relaxations.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from surfdiff_core.config import RelaxConfig, SurfdiffConfig
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import now

DFT_METHODS = ("gpaw", "vasp")


@dataclass
class RelaxSummary:
    method: str
    candidates: int = 0
    skipped: int = 0
    relaxed: int = 0
    failed: int = 0
    best: dict[str, float] = field(default_factory=dict)  # "composition cell" -> lowest relaxed energy
    doc_ids: list[str] = field(default_factory=list)


def select_candidates(
    store: ResultsStore, *, top_k: int, model_id: str | None = None, run_id: str | None = None,
    system_ids: list[str] | None = None,
) -> list[StructureDoc]:
    """The K lowest-MLFF-energy valid generated structures per (system, composition)."""
    crit: dict = {"source": "generated", "valid": True, "in_box": True, "energy": {"$ne": None}}
    if model_id:
        crit["model_id"] = model_id
    if run_id:
        crit["run_id"] = run_id
    if system_ids:
        crit["system_id"] = {"$in": system_ids}
    groups: dict[tuple[str, str], list[StructureDoc]] = {}
    for d in sorted(store.find(crit), key=lambda d: (d.energy, d.doc_id)):
        g = groups.setdefault((d.system_id, d.composition), [])
        if len(g) < top_k:
            g.append(d)
    return [d for g in groups.values() for d in g]


def relaxed_doc_id(parent: StructureDoc, rcfg: RelaxConfig) -> str:
    source = "dft" if rcfg.method in DFT_METHODS else "relaxed"
    settings = json.dumps(rcfg.settings, sort_keys=True, default=str)
    return make_doc_id(source, parent.doc_id, rcfg.method, settings, rcfg.fmax, rcfg.steps)


def candidate_structure(doc: StructureDoc):
    """pymatgen Structure with selective dynamics: the fixed bottom layers cannot move."""
    s = doc.to_structure()
    fixed = set(doc.fixed)
    s.add_site_property("selective_dynamics", [[i not in fixed] * 3 for i in range(len(s))])
    return s


def run_relax(
    cfg: SurfdiffConfig, store: ResultsStore, *, rcfg: RelaxConfig | None = None,
    candidates: list[StructureDoc] | None = None, run_id: str | None = None, jobs_store=None,
    store_path: str | None = None,
) -> RelaxSummary:
    from surfdiff_core.relax.jobflow_relax import make_relax_flow, run_relax_flow

    rcfg = rcfg or cfg.relax
    if candidates is None:
        candidates = select_candidates(store, top_k=rcfg.top_k)
    summary = RelaxSummary(method=rcfg.method, candidates=len(candidates))
    ids = {d.doc_id: relaxed_doc_id(d, rcfg) for d in candidates}
    done = store.existing_ids(ids.values())
    todo = [d for d in candidates if ids[d.doc_id] not in done]
    summary.skipped = len(candidates) - len(todo)
    summary.doc_ids = list(ids.values())
    if todo:
        settings = {"fmax": rcfg.fmax, "steps": rcfg.steps, **rcfg.settings}
        inputs = [(candidate_structure(d), {"parent_id": d.doc_id, "doc_id": ids[d.doc_id]}) for d in todo]
        flow = make_relax_flow(inputs, rcfg.method, settings)
        if jobs_store is None:
            from surfdiff_core.stages.common import jobs_store_for

            jobs_store = jobs_store_for(cfg, store_path)
        with warnings.catch_warnings():  # jobflow's notes on independent jobs and its own deprecations
            warnings.filterwarnings("ignore", message="Some jobs are not connected")
            warnings.filterwarnings("ignore", category=FutureWarning, module="jobflow")
            outcomes = run_relax_flow(flow, jobs_store)
        by_parent = {d.doc_id: d for d in todo}
        for out in outcomes:
            parent = by_parent[out.metadata["parent_id"]]
            doc = _relaxed_doc(parent, out, rcfg, ids[parent.doc_id], run_id)
            store.put(doc)
            if doc.error:
                summary.failed += 1
            else:
                summary.relaxed += 1
    for d in store.find({"doc_id": {"$in": list(ids.values())}}):
        if d.energy is not None and not d.error:
            key = f"{d.composition} {d.cell}"
            summary.best[key] = min(summary.best.get(key, np.inf), d.energy)
    return summary


def _relaxed_doc(parent: StructureDoc, out, rcfg: RelaxConfig, doc_id: str, run_id: str | None) -> StructureDoc:
    from pymatgen.io.ase import AseAtomsAdaptor

    from surfdiff_core.store.documents import atoms_to_structure_dict

    source = "dft" if rcfg.method in DFT_METHODS else "relaxed"
    base = parent.model_dump(exclude={"doc_id", "source", "structure", "energy", "forces", "fmax", "steps",
                                      "converged", "wall_time", "oracle", "oracle_settings", "initial_structure",
                                      "trajectory", "parent_id", "run_id", "error", "meta", "created_at",
                                      "updated_at", "valid", "in_box"})
    if out.success and out.structure is not None:
        atoms = AseAtomsAdaptor.get_atoms(out.structure)
        atoms.pbc = [True, True, False]
        z = atoms.positions[parent.n_substrate :, 2]
        in_box = bool(np.all((z >= parent.z_box[0] - 0.05) & (z <= parent.z_box[1] + 0.05)))
        forces = np.asarray(out.forces) if out.forces is not None else None
        movable_fmax = None
        if forces is not None:
            free = np.ones(len(forces), bool)
            free[parent.fixed] = False
            movable_fmax = float(np.linalg.norm(forces[free], axis=1).max())
        return StructureDoc(
            doc_id=doc_id, source=source, structure=atoms_to_structure_dict(atoms), energy=out.energy,
            forces=np.round(forces, 6).tolist() if forces is not None else None, fmax=movable_fmax,
            steps=out.steps, converged=out.converged, oracle=rcfg.method, oracle_settings=rcfg.settings,
            initial_structure=parent.structure, parent_id=parent.doc_id, run_id=run_id, in_box=in_box,
            meta={"jobflow_uuid": out.uuid, "parent_energy": parent.energy, "relaxed_at": now().isoformat()},
            **base,
        )
    return StructureDoc(
        doc_id=doc_id, source=source, structure=parent.structure, energy=None, valid=False,
        error=(out.error or "relaxation failed")[:500], oracle=rcfg.method, oracle_settings=rcfg.settings,
        parent_id=parent.doc_id, run_id=run_id, meta={"jobflow_uuid": out.uuid}, **base,
    )
