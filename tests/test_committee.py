"""MLFF committee (train.ensemble): exact mean and spread, relaxation in the mean, members trained and registered
beside the sampling model, never sampled with, carried into sample ids, and fine-tuned member by member."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surfdiff_core.config import load_config
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.geometry.batch import collate
from surfdiff_core.ml.committee import Committee
from surfdiff_core.ml.models import ModelSpec, SurfaceModel
from surfdiff_core.relax.mlff import mlff_relax
from surfdiff_core.stages import active, rss, sample, train
from surfdiff_core.stages.common import model_registry, open_study_store, training_energy_models, training_system
from surfdiff_core.train.checkpoint import load_checkpoint
from tests.conftest import TINY_CONFIG
from tests.test_painn import _two_slabs

SPEC = ModelSpec(n_features=16, n_rbf=8, n_interactions=2, cutoff=4.5, elements=[8, 47], time_features=8)


def _model(seed: int) -> SurfaceModel:
    torch.manual_seed(seed)
    model = SurfaceModel(SPEC).double()
    with torch.no_grad():  # a non-trivial energy head, as after training
        model.energy_head[-1].weight.normal_(std=0.5)
    return model.eval()


def test_one_model_committee_is_the_model_and_two_average_exactly():
    batch = _two_slabs()
    a, b = _model(0), _model(1)
    alone = a.denoise(batch, 0.0, with_forces=True)
    one = Committee([a])
    pred = one.predict(batch)
    torch.testing.assert_close(pred.energy, alone.energy)
    torch.testing.assert_close(one(batch, torch.zeros(2), with_forces=True).forces, alone.forces)
    assert torch.all(pred.energy_std == 0)

    two = Committee([a, b]).predict(batch)
    pa, pb = Committee([a]).predict(batch), Committee([b]).predict(batch)
    assert not torch.allclose(pa.energy, pb.energy)
    torch.testing.assert_close(two.energy, (pa.energy + pb.energy) / 2)
    torch.testing.assert_close(two.energy_std, (pa.energy - pb.energy).abs() / 2**0.5)
    torch.testing.assert_close(two.forces, (pa.forces + pb.forces) / 2)
    with pytest.raises(ValueError):
        Committee([])


def test_members_of_other_cutoffs_find_their_own_pairs():
    """The pair list is shared only between members of one cutoff: a member with another sees its own pairs."""
    batch = _two_slabs()
    torch.manual_seed(3)
    wide = SurfaceModel(ModelSpec(**{**SPEC.__dict__, "cutoff": 6.0})).double().eval()
    with torch.no_grad():
        wide.energy_head[-1].weight.normal_(std=0.5)
    a = _model(0)
    mixed = Committee([a, wide]).predict(batch)
    alone = [m(batch, None, score=False, energy=True, forces=True) for m in (a, wide)]
    torch.testing.assert_close(mixed.energy, (alone[0].energy + alone[1].energy) / 2)
    torch.testing.assert_close(mixed.forces, (alone[0].forces + alone[1].forces) / 2)


def test_relaxing_in_the_committee_lowers_its_mean_energy_and_moves_no_masked_atom():
    batch = _two_slabs()
    committee = Committee([_model(0), _model(1), _model(2)])
    relaxed, info = mlff_relax(committee, batch, steps=20, max_step=0.05)
    before, after = committee.predict(batch).energy, committee.predict(relaxed).energy
    assert torch.all(after < before)
    torch.testing.assert_close(info.energy, after)
    fixed = ~batch.movable
    torch.testing.assert_close(relaxed.positions[fixed], batch.positions[fixed])


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "committee.yaml"
    text = TINY_CONFIG.replace("STORE", str(tmp_path / "store"))
    text = text.replace("energy_window: 5.0}", "energy_window: 5.0, ensemble: 3}")
    path.write_text(text + "active_learning: {rounds: 1, relax_per_round: 1, epochs: 1}\n")
    cfg = load_config(path)
    store = open_study_store(cfg).connect()
    yield cfg, store, rss.run(cfg, store, progress=False)
    store.close()


def test_members_are_trained_registered_and_rank_the_samples(study):
    cfg, store, data = study
    model = train.run(cfg, store, data, progress=False)
    assert len(model.committee) == 2 and model.model_id not in model.committee
    with model_registry(cfg) as registry:
        members = [registry.get(m) for m in model.committee]
        assert registry.get(model.model_id).committee == model.committee
        # the newest model of the study is the sampling model, never an MLFF-only member
        newest = registry.resolve(study=cfg.name, system_id=training_system(cfg).system_id,
                                  energy_model=training_energy_models(cfg)[0])
        assert newest.model_id == model.model_id
        with pytest.raises(SurfdiffError, match="committee member"):
            registry.resolve(study=cfg.name, system_id="", energy_model="", model_id=model.committee[0])
    assert all(m.member_of == model.model_id and m.train["score_weight"] == 0 for m in members)
    assert len({m.train["seed"] for m in members}) == 2
    weights = [load_checkpoint(m.checkpoint).model.energy_head[0].weight for m in members]
    assert not torch.allclose(*weights)  # different seeds: different models

    drawn = sample.run(cfg, store, model, progress=False)
    docs = list(store.find({"doc_id": {"$in": drawn.targets[0].doc_ids}}))
    assert len(docs) == cfg.sample.n
    assert all(d.meta["committee"] == model.committee and d.meta["mlff_energy_std"] > 0 for d in docs)
    # the stored energy is the committee's mean at the stored positions
    loaded = [load_checkpoint(p) for p in [model.checkpoint, *(m.checkpoint for m in members)]]
    committee = Committee([m.model for m in loaded])
    d = docs[0]
    batch = collate([d.to_atoms()], [np.asarray(d.movable)], [tuple(d.z_box)])
    with torch.no_grad():
        assert float(committee.predict(batch).energy[0]) == pytest.approx(d.energy, abs=1e-3)
    # the same settings without the committee are other samples
    alone = train.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"ensemble": 1})}), store, data,
                      progress=False)
    assert alone.model_id == model.model_id and alone.committee == []
    single = sample.run(cfg, store, alone, progress=False)
    assert not set(single.targets[0].doc_ids) & set(drawn.targets[0].doc_ids)


def test_active_learning_fine_tunes_every_member_from_its_own_weights(study):
    cfg, store, data = study
    first = train.run(cfg, store, data, progress=False)
    res = active.run(cfg, store, first, progress=False)
    new = res.model
    assert len(new.committee) == 2 and not set(new.committee) & set(first.committee)
    with model_registry(cfg) as registry:
        recs = [registry.get(m) for m in new.committee]
    assert all(r.round == 1 and r.member_of == new.model_id and r.learned_labels == new.learned_labels
               for r in recs)
    for old_id, rec in zip(first.committee, recs, strict=True):  # member k from the previous member k
        provenance = load_checkpoint(rec.checkpoint).meta["data"]
        assert set(new.learned_labels) <= set(provenance["doc_ids"]) and provenance["parent"] == old_id
