"""Shared batches across targets (sample.share_batches): cells of different sizes in one batch, written per
batch, resumable, deterministic, and the substrate never moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surfdiff_core.config import SampleTarget, load_config
from surfdiff_core.sample import shared
from surfdiff_core.sample.generate import generated_doc_id
from surfdiff_core.stages.common import open_study_store, target_system


@pytest.fixture
def setup(tiny_config, single_thread):
    from surfdiff_core.train.checkpoint import LoadedModel
    from surfdiff_core.train.trainer import make_model, make_process

    cfg = load_config(tiny_config)
    torch.manual_seed(0)
    loaded = LoadedModel(make_model(cfg.model, [8, 47]).eval(), make_process(cfg.model), "m-untrained", {})
    systems = [target_system(cfg, SampleTarget(cell="p(2x2)", composition="Ag1O1")),
               target_system(cfg, SampleTarget(cell="p(3x3)", composition="Ag2O1"))]
    scfg = cfg.sample.model_copy(update={"n": 3, "batch_size": 4, "steps": 5, "relax_steps": 3,
                                         "share_batches": True})
    return cfg, loaded, systems, scfg


def test_layout_mixes_targets_in_order():
    batches = shared.layout(2, 3, 4)
    assert [[(s.target, s.index) for s in b] for b in batches] == [[(0, 0), (0, 1), (0, 2), (1, 0)],
                                                                  [(1, 1), (1, 2)]]


def test_one_batch_holds_two_cells_and_each_sample_is_its_own_targets(setup):
    cfg, loaded, systems, scfg = setup
    with open_study_store(cfg) as store:
        per_target, ran = shared.sample_shared(store, loaded, systems, scfg, progress=False, study=cfg.name)
    assert ran["structure_steps"] == 6 * scfg.steps
    for system, docs in zip(systems, per_target, strict=True):
        assert [d.meta["index"] for d in docs] == [0, 1, 2]
        for d in docs:
            assert (d.cell, d.composition, d.system_id) == (system.cell, system.composition, system.system_id)
            atoms = d.to_atoms()
            assert len(atoms) == system.n_atoms
            # the masked substrate is where the template has it (to the float32 of the batch, as per target)
            np.testing.assert_allclose(atoms.positions[: system.n_substrate],
                                       system.template.positions[: system.n_substrate], atol=2e-6)
            assert np.allclose(atoms.cell.array[:2], system.template.cell.array[:2])
        # shared samples are other samples than per-target ones: their ids say so
        plain = scfg.model_copy(update={"share_batches": False})
        assert docs[0].doc_id != generated_doc_id(loaded.model_id, system, plain, scfg.seed, 0)


def test_a_killed_run_resumes_with_only_the_missing_batch_and_repeats_itself(setup, monkeypatch):
    cfg, loaded, systems, scfg = setup
    with open_study_store(cfg) as store:
        real_put = store.put_many
        calls = {"n": 0}

        def dying_put(docs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed while writing the second batch
            return real_put(docs)

        monkeypatch.setattr(store, "put_many", dying_put)
        with pytest.raises(KeyboardInterrupt):
            shared.sample_shared(store, loaded, systems, scfg, progress=False, study=cfg.name)
        monkeypatch.setattr(store, "put_many", real_put)
        first = {d.doc_id: d.to_atoms().positions for d in store.find({"source": "generated"})}
        assert len(first) == 4  # the first batch: 3 of target 0 and 1 of target 1
        ran_batches = []
        real_gen = shared.shared_generator
        monkeypatch.setattr(shared, "shared_generator",
                            lambda seed, k, device: ran_batches.append(k) or real_gen(seed, k, device))
        per_target, ran = shared.sample_shared(store, loaded, systems, scfg, progress=False, study=cfg.name)
        assert ran_batches == [1]
        assert ran["reused_batches"] == [1, 1]
        assert [len(d) for d in per_target] == [3, 3]
        for d in per_target[0] + per_target[1]:
            if d.doc_id in first:
                np.testing.assert_array_equal(d.to_atoms().positions, first[d.doc_id])
    # the same seed from scratch gives the same samples, batch by batch
    other = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(cfg.store.path) + "-2"})})
    with open_study_store(other) as store2:
        again, _ = shared.sample_shared(store2, loaded, systems, scfg, progress=False, study=cfg.name)
    for a, b in zip(per_target[1], again[1], strict=True):
        np.testing.assert_allclose(a.to_atoms().positions, b.to_atoms().positions, atol=1e-10)


def test_shared_batches_refuse_per_target_conditioning():
    from pydantic import ValidationError

    from surfdiff_core.config import SampleConfig

    with pytest.raises(ValidationError, match="share_batches"):
        SampleConfig(share_batches=True, novelty=0.5)
    with pytest.raises(ValidationError, match="share_batches"):
        SampleConfig(share_batches=True, seed_structure="x.extxyz")


@pytest.mark.slow
def test_the_sample_flow_shares_batches_over_the_targets(prefect_harness, tmp_path, lattice_cache):
    """Through Prefect: one task samples every target (the shipped EMT model, no training)."""
    from flows.sample import sample_flow
    from tests.test_pretrained import study

    _, cfg = study(tmp_path, init="null")
    targets = [SampleTarget(cell="p(2x2)", composition="Ag2O1"), SampleTarget(cell="p(3x3)", composition="Ag2O1")]
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={
        "targets": targets, "n": 3, "steps": 8, "batch_size": 4, "share_batches": True})})
    result = sample_flow(study=cfg, model_id="emt-ag111-o")
    assert [(t.cell, t.n) for t in result.targets] == [("p(2x2)", 3), ("p(3x3)", 3)]
    with open_study_store(cfg) as store:
        docs = list(store.find({"source": "generated", "doc_id": {"$in": result.doc_ids}}))
    assert len(docs) == 6 and {d.cell for d in docs} == {"p(2x2)", "p(3x3)"}
    assert all(d.meta["index"] in (0, 1, 2) for d in docs)
