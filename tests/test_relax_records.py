"""A relaxed structure is recorded alike by every route: the RSS, the oracle labels of samples and the relax stage.

Each route gets the same relaxed ase.Atoms (EMT, a tiny Ag(111)+O slab) and must write exactly the fields it wrote
before the three builders became one; every field of every document is compared.
"""

from __future__ import annotations

import copy
from concurrent.futures import Executor, Future

import numpy as np
import pytest
from ase.calculators.emt import EMT
from pymatgen.io.ase import AseAtomsAdaptor

import surfdiff_core.relax.ase_relax as ase_relax
from surfdiff_core.config import config_from_dict
from surfdiff_core.relax.ase_relax import RelaxError, relax_atoms
from surfdiff_core.relax.jobflow_relax import RelaxOutcome
from surfdiff_core.rss import RSSTask, relax_task
from surfdiff_core.stages import relax as relax_stage
from surfdiff_core.stages.common import training_system
from surfdiff_core.stages.oracle_relax import relax_samples, single_points
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id, open_store
from surfdiff_core.store.documents import atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import RELAXED_BOX_TOLERANCE, in_confinement_box

SEED = 7
# Always fresh: stamped by the store or the clock, never part of what a route decides.
_VOLATILE = {"created_at", "updated_at"}


@pytest.fixture
def case(tmp_path):
    cfg = config_from_dict({
        "name": "records", "substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1, "vacuum": 7},
        "confinement": {"z_min": 0.5, "z_max": 4.0},
        "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"], "n": 1, "fmax": 0.2, "steps": 30},
        "relax": {"method": "emt", "steps": 30, "fmax": 0.2},
        "store": {"backend": "sqlite", "path": str(tmp_path / "store")},
    })
    system = training_system(cfg)
    initial = system.random_structure(np.random.default_rng(SEED))
    r = cfg.rss
    res = relax_atoms(initial, EMT(), fmax=r.fmax, steps=r.steps, optimizer=r.optimizer,
                      trajectory_every=r.trajectory_every, fixed=system.fixed_indices.tolist())
    parent = StructureDoc(
        doc_id="generated-parent", source="generated", study=cfg.name, energy_model="mlff:model-x",
        structure=atoms_to_structure_dict(initial), composition=system.composition,
        formula=initial.get_chemical_formula(), system_id=system.system_id, element=system.element,
        facet=system.facet, cell=system.cell, n_substrate=system.n_substrate, movable=system.movable.tolist(),
        fixed=system.fixed_indices.tolist(), z_box=list(system.z_box), energy=-1.5, model_id="model-x",
        config_hash="hash-of-sampler", seed=3, run_id="sample-run", meta={"sampler": "em"},
    )
    return cfg, system, initial, res, parent


def _capturing_store(cfg, monkeypatch) -> tuple[ResultsStore, list[StructureDoc]]:
    store = open_store(cfg.store).connect()
    written: list[StructureDoc] = []
    put = store.put

    def capture(doc: StructureDoc) -> None:
        written.append(doc.model_copy(deep=True))
        put(doc)

    monkeypatch.setattr(store, "put", capture)
    return store, written


def _relaxing_to(monkeypatch, res) -> list[dict]:
    """relax_atoms returns `res` (whatever it is given); its calls are kept."""
    calls: list[dict] = []

    def fake(atoms, calculator, **kwargs):
        calls.append({"positions": atoms.get_positions(), **kwargs})
        if isinstance(res, Exception):
            raise res
        return copy.deepcopy(res)

    monkeypatch.setattr(ase_relax, "relax_atoms", fake)
    return calls


def _dump(doc: StructureDoc) -> dict:
    return doc.model_dump(mode="json", exclude=_VOLATILE)


def _in_box(atoms, n_substrate, z_box) -> bool:
    return bool(np.all(in_confinement_box(atoms.positions, n_substrate, z_box, RELAXED_BOX_TOLERANCE)))


def _result_fields(res, system) -> dict:
    traj = res.trajectory
    return {
        "structure": atoms_to_structure_dict(res.atoms), "energy": float(res.energy),
        "forces": np.round(res.forces, 6).tolist(), "fmax": float(res.fmax), "steps": int(res.steps),
        "converged": bool(res.converged), "wall_time": float(res.wall_time),
        "in_box": _in_box(res.atoms, system.n_substrate, system.z_box),
        "trajectory": [f.model_dump() for f in frames_from_arrays(
            [f["positions"] for f in traj], [f["energy"] for f in traj], [f["forces"] for f in traj])],
    }


def _system_fields(system, initial) -> dict:
    return {"composition": system.composition, "formula": initial.get_chemical_formula(),
            "system_id": system.system_id, "element": system.element, "facet": system.facet, "cell": system.cell,
            "n_substrate": system.n_substrate, "movable": system.movable.tolist(),
            "fixed": system.fixed_indices.tolist(), "z_box": list(system.z_box)}


def _blank(**fields) -> dict:
    """Every field of a document at its default, then `fields`."""
    defaults = {"study": None, "energy_model": None, "in_box": True, "valid": True, "energy": None, "forces": None,
                "fmax": None, "steps": None, "converged": None, "wall_time": None, "oracle": None,
                "oracle_settings": {}, "initial_structure": None, "trajectory": [], "parent_id": None,
                "model_id": None, "config_hash": None, "run_id": None, "seed": None, "error": None, "meta": {}}
    return {**defaults, **fields}


def _expect(doc: StructureDoc, fields: dict) -> None:
    got = _dump(doc)
    want = StructureDoc(**fields).model_dump(mode="json", exclude=_VOLATILE)  # the same JSON round trip
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], key


# ---- the RSS --------------------------------------------------------------------------------------------------
def _rss_task(cfg, system) -> RSSTask:
    return RSSTask(index=0, composition=system.composition, seed=SEED, doc_id="rss-records-0")


def _rss_base(cfg, system, initial, task) -> dict:
    return dict(
        doc_id=task.doc_id, source="rss", study=cfg.name, energy_model=cfg.oracle.energy_model,
        oracle=cfg.oracle.name, oracle_settings=cfg.oracle.settings, initial_structure=atoms_to_structure_dict(initial),
        run_id="run-1", seed=SEED, config_hash=cfg.section_hash("substrate", "confinement", "oracle"),
        **_system_fields(system, initial),
    )


def test_rss_records_a_relaxation(case, monkeypatch):
    cfg, system, initial, res, _ = case
    calls = _relaxing_to(monkeypatch, res)
    task = _rss_task(cfg, system)
    doc = relax_task(system, task, cfg, run_id="run-1", calculator=EMT())
    assert np.array_equal(calls[0]["positions"], initial.positions)
    assert {k: calls[0][k] for k in ("fmax", "steps", "optimizer", "trajectory_every", "fixed")} == {
        "fmax": cfg.rss.fmax, "steps": cfg.rss.steps, "optimizer": cfg.rss.optimizer,
        "trajectory_every": cfg.rss.trajectory_every, "fixed": system.fixed_indices.tolist()}
    _expect(doc, _blank(**_rss_base(cfg, system, initial, task), **_result_fields(res, system),
                        meta={"rss_index": 0, "optimizer": cfg.rss.optimizer}))


def test_rss_records_a_failed_relaxation(case, monkeypatch):
    cfg, system, initial, _, _ = case
    _relaxing_to(monkeypatch, RelaxError("x" * 600))
    task = _rss_task(cfg, system)
    doc = relax_task(system, task, cfg, run_id="run-1", calculator=EMT())
    error = f"RelaxError: {'x' * 600}"[:500]
    base = _rss_base(cfg, system, initial, task)
    _expect(doc, _blank(**base, structure=base["initial_structure"], valid=False, error=error,
                        meta={"rss_index": 0, "optimizer": cfg.rss.optimizer, "attempts": 1, "errors": [error]}))


# ---- oracle labels of samples ----------------------------------------------------------------------------------
def _label_base(cfg, parent, source: str, *settings) -> dict:
    return dict(
        doc_id=make_doc_id(source, parent.doc_id, "t", cfg.oracle.energy_model, *settings), source=source,
        study=cfg.name, energy_model=cfg.oracle.energy_model, oracle=cfg.oracle.name, parent_id=parent.doc_id,
        **parent.model_dump(include={"composition", "formula", "system_id", "element", "facet", "cell",
                                     "n_substrate", "movable", "fixed", "z_box", "model_id", "seed"}),
    )


def test_oracle_relaxation_of_a_sample_records_a_relaxation(case, monkeypatch):
    cfg, system, _, res, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    calls = _relaxing_to(monkeypatch, res)
    relax_samples(cfg, store, system, [parent], EMT(), tag="t", meta={"round": 2}, progress=False)
    assert calls[0]["steps"] == cfg.rss.steps and calls[0]["fixed"] == parent.fixed
    r = cfg.rss
    (doc,) = written
    _expect(doc, _blank(**_label_base(cfg, parent, "relaxed", r.fmax, r.steps, r.optimizer),
                        **_result_fields(res, system), initial_structure=parent.structure,
                        oracle_settings=cfg.oracle.settings,
                        meta={"round": 2, "purpose": "t", "mlff_energy": parent.energy, "relaxer": r.optimizer}))
    store.close()


def test_single_point_of_a_sample_records_one_frame_in_place(case, monkeypatch):
    cfg, system, _, res, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    calls = _relaxing_to(monkeypatch, res)
    single_points(cfg, store, system, [parent], EMT(), tag="t", progress=False)
    assert calls[0]["steps"] == 0
    (doc,) = written
    _expect(doc, _blank(**_label_base(cfg, parent, "single_point"), **{
        **_result_fields(res, system), "structure": parent.structure}, oracle_settings=cfg.oracle.settings,
        meta={"purpose": "t", "mlff_energy": parent.energy}))
    store.close()


def test_oracle_relaxation_of_a_sample_records_a_failure(case, monkeypatch):
    cfg, system, _, _, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    _relaxing_to(monkeypatch, RuntimeError("SCF did not converge"))
    relax_samples(cfg, store, system, [parent], EMT(), tag="t", progress=False)
    r = cfg.rss
    error = "RuntimeError: SCF did not converge"
    (doc,) = written
    _expect(doc, _blank(**_label_base(cfg, parent, "relaxed", r.fmax, r.steps, r.optimizer),
                        structure=parent.structure, valid=False, error=error,
                        meta={"purpose": "t", "mlff_energy": parent.energy, "relaxer": r.optimizer, "attempts": 1,
                              "errors": [error]}))
    store.close()


# ---- the relax stage (jobflow outcomes) ------------------------------------------------------------------------
class _Finished(Executor):
    """Hands back `outcome` (with the job's own metadata) as a finished job's result."""

    def __init__(self, outcome: RelaxOutcome) -> None:
        self.outcome = outcome

    def submit(self, fn, structure, meta, method, settings):
        fut: Future = Future()
        fut.set_result(RelaxOutcome(**{**self.outcome.__dict__, "metadata": dict(meta)}))
        return fut


def _stage_base(cfg, parent) -> dict:
    rcfg = cfg.relax
    return dict(
        doc_id=relax_stage.relaxed_doc_id(parent, rcfg), source="relaxed", study=cfg.name,
        energy_model=rcfg.energy_model, oracle=rcfg.method, oracle_settings=rcfg.settings, parent_id=parent.doc_id,
        run_id="relax-run",
        **parent.model_dump(include={"composition", "formula", "system_id", "element", "facet", "cell",
                                     "n_substrate", "movable", "fixed", "z_box", "model_id", "config_hash",
                                     "seed"}),
    )


def test_relax_stage_records_a_relaxation(case, monkeypatch):
    cfg, _, _, res, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    outcome = RelaxOutcome(index=0, metadata={}, success=True, method="emt", job_uuid="uuid-1",
                           structure=AseAtomsAdaptor.get_structure(res.atoms), energy=float(res.energy),
                           forces=np.asarray(res.forces), steps=int(res.steps), converged=bool(res.converged))
    summary = relax_stage.run(cfg, store, candidates=[parent], run_id="relax-run", executor=_Finished(outcome))
    assert (summary.relaxed, summary.failed) == (1, 0)
    (doc,) = written
    atoms = AseAtomsAdaptor.get_atoms(outcome.structure)
    atoms.pbc = [True, True, False]
    free = np.ones(len(res.forces), bool)
    free[parent.fixed] = False
    got_meta = _dump(doc)["meta"]
    assert set(got_meta) == {"jobflow_uuid", "parent_energy", "relaxed_at"}
    _expect(doc, _blank(**_stage_base(cfg, parent), structure=atoms_to_structure_dict(atoms), energy=res.energy,
                        forces=np.round(res.forces, 6).tolist(),
                        fmax=float(np.linalg.norm(res.forces[free], axis=1).max()), steps=int(res.steps),
                        converged=bool(res.converged), initial_structure=parent.structure,
                        in_box=_in_box(atoms, parent.n_substrate, parent.z_box),
                        meta={"jobflow_uuid": "uuid-1", "parent_energy": parent.energy,
                              "relaxed_at": got_meta["relaxed_at"]}))
    store.close()


def test_relax_stage_records_a_relaxation_without_forces(case, monkeypatch):
    cfg, _, _, res, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    outcome = RelaxOutcome(index=0, metadata={}, success=True, method="emt", job_uuid="uuid-1",
                           structure=AseAtomsAdaptor.get_structure(res.atoms), energy=float(res.energy))
    relax_stage.run(cfg, store, candidates=[parent], run_id="relax-run", executor=_Finished(outcome))
    (doc,) = written
    assert doc.forces is None and doc.fmax is None and doc.steps is None and doc.converged is None
    assert doc.energy == res.energy and doc.valid and doc.error is None and doc.wall_time is None
    store.close()


@pytest.mark.parametrize("error", [None, "ValueError: " + "y" * 600])
def test_relax_stage_records_a_failed_job(case, monkeypatch, error):
    cfg, _, _, _, parent = case
    store, written = _capturing_store(cfg, monkeypatch)
    outcome = RelaxOutcome(index=0, metadata={}, success=False, method="emt", job_uuid="uuid-2", error=error)
    summary = relax_stage.run(cfg, store, candidates=[parent], run_id="relax-run", executor=_Finished(outcome))
    assert (summary.relaxed, summary.failed) == (0, 1)
    why = (error or "relaxation failed")[:500]
    (doc,) = written
    _expect(doc, _blank(**_stage_base(cfg, parent), structure=parent.structure, valid=False, error=why,
                        meta={"jobflow_uuid": "uuid-2", "attempts": 1, "errors": [why]}))
    store.close()
