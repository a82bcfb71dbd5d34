"""Active-learning single points: one oracle call on the next best samples, MLFF data only, charged in the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.calculators.emt import EMT

from surfdiff_core.config import load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.evaluate.budget import single_point_charge
from surfdiff_core.stages import active, evaluate, rss, sample, train
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.store import StructureDoc
from surfdiff_core.train import trainer
from surfdiff_core.train.checkpoint import load_checkpoint
from surfdiff_core.train.data import DataScope, load_samples
from tests.conftest import TINY_CONFIG

AL = "active_learning: {rounds: 1, relax_per_round: 1, single_points_per_round: 3, epochs: 2}\n"


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "sp.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")).replace("n: 4\n", "n: 8\n") + AL)
    cfg = load_config(path)
    store = open_study_store(cfg).connect()
    first = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
    yield cfg, store, first
    store.close()


def test_single_points_label_the_next_best_samples_with_the_oracle(study):
    cfg, store, first = study
    res = active.run(cfg, store, first, progress=False)
    assert res.relaxations == 1 and res.single_points == 3 and res.rounds[0]["single_points"] == 3
    points = list(store.find({"source": "single_point"}))
    relaxed = list(store.find({"source": "relaxed", "meta.active_learning": True}))
    assert len(points) == 3 and len(relaxed) == 1
    parents = [store.get(p.parent_id) for p in points]
    # the samples after the relaxed one in MLFF rank order, each a different sample
    assert relaxed[0].parent_id not in {p.doc_id for p in parents} and len({p.doc_id for p in parents}) == 3
    assert min(p.energy for p in parents) >= store.get(relaxed[0].parent_id).energy
    for doc, parent in zip(points, parents, strict=True):  # the oracle's energy and forces at the sample itself
        atoms = parent.to_atoms()
        atoms.calc = EMT()
        assert doc.steps == 0 and doc.structure == parent.structure and doc.meta["round"] == 1
        assert doc.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        full = store.get(doc.doc_id)  # forces and frames live beside the document
        assert np.allclose(full.forces, atoms.get_forces(), atol=1e-5) and len(full.trajectory) == 1
    trained_on = set(load_checkpoint(res.model.checkpoint).meta["data"]["doc_ids"])
    assert {p.doc_id for p in points} <= trained_on and set(res.model.learned_labels) >= {p.doc_id for p in points}
    n = store.count({})  # a rerun (after a kill) repeats no oracle call
    assert active.run(cfg, store, first, progress=False).model.model_id == res.model.model_id
    assert store.count({}) == n
    # the evaluation charges the single points in force calls of an RSS relaxation, before the samples
    ev = evaluate.run(cfg, store, sample.run(cfg, store, res.model, progress=False), progress=False)
    t = ev.targets[0]
    rss_docs = [store.get(i) for i in t.rss_ids]
    assert t.active_learning_labels == 1 and t.active_learning_single_points == 3
    assert t.single_point_charge == math.ceil(3 / np.mean([d.steps + 1 for d in rss_docs])) == 1
    assert math.isnan(t.generative_energies[1]) and len(t.generative_energies) == 2 + len(t.relaxed_ids)
    assert ev.training_cost["active_learning_labels"] == 1
    assert ev.training_cost["active_learning_single_points"] == 3


def test_single_points_are_mlff_data_and_never_denoiser_data(study, monkeypatch):
    cfg, store, first = study
    res = active.run(cfg, store, first, progress=False)
    scope = DataScope(study=cfg.name, system_id=first.system_id, energy_models=("emt",),
                      learned_systems=tuple({d.system_id for d in store.find({"source": "single_point"})}),
                      learned_labels=tuple(res.model.learned_labels))
    # a single point far above every minimum of its composition stays in: the energy window is over minima
    point = next(iter(store.find({"source": "single_point"})))
    high = point.model_copy(update={"doc_id": point.doc_id + "-high", "energy": point.energy + 50.0})
    store.put(high)
    tight = cfg.train.model_copy(update={"energy_window": 0.1})
    scope = DataScope(**{**scope.__dict__, "learned_labels": (*scope.learned_labels, high.doc_id)})
    samples, ids = load_samples(store, scope, tight)
    assert high.doc_id in ids
    flags = {s.doc_id: s.denoise for s in samples}
    assert flags[high.doc_id] is False and flags[high.doc_id + "x2"] is False
    assert all(flags[i] for i in ids if store.get(i).source != "single_point")
    seen: list[list[str]] = []
    real = trainer._score_loss

    def spy(model, process, batch, *args):
        seen.append([s.doc_id for s in batch])
        return real(model, process, batch, *args)

    monkeypatch.setattr(trainer, "_score_loss", spy)
    trainer.train(store, cfg.model, tight, scope=scope, checkpoint_dir=store_dir(cfg), progress=False,
                  max_epochs=1)
    denoised = {i for batch in seen for i in batch}
    assert denoised and not {i.removesuffix("x2") for i in denoised} & {
        d.doc_id for d in store.find({"source": "single_point"})}


def store_dir(cfg) -> str:
    from surfdiff_core.stages.common import checkpoint_dir

    return str(checkpoint_dir(cfg)) + "-spy"


def test_single_point_charge_counts_force_calls():
    def relaxation(steps: int) -> StructureDoc:
        return StructureDoc.model_construct(steps=steps)

    assert single_point_charge(0, [relaxation(99)]) == 0
    assert single_point_charge(100, [relaxation(99)]) == 1
    assert single_point_charge(101, [relaxation(99), relaxation(99)]) == 2
    assert single_point_charge(30, [relaxation(9), relaxation(29)]) == 2  # mean 20 calls
    assert single_point_charge(3, []) == 3  # nothing says what a relaxation costs: one each


def test_a_round_without_labels_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "s"))
                    + "active_learning: {rounds: 1, relax_per_round: 0}\n")
    with pytest.raises(ConfigError, match="relax_per_round or single_points_per_round"):
        load_config(path)


@pytest.mark.slow
def test_the_prefect_flow_runs_single_point_rounds(prefect_harness, study):
    from flows.active import active_learning_flow

    cfg, store, first = study
    res = active_learning_flow(study=cfg, upstream=first, rounds=2)
    assert [r["single_points"] for r in res.rounds] == [3, 3] and res.single_points == 6 and res.relaxations == 2
    assert store.count({"source": "single_point", "meta.round": 2}) == 3
    assert set(res.model.learned_labels) == {d.doc_id for d in store.find({"meta.active_learning": True})}
