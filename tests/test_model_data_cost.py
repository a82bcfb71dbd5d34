"""The training-data cost the evaluation charges is the model's own, by the ids its record carries
(ModelRecord.data_cost_ids): every relaxation its data was chosen from, not only those the trainer kept; and for a
record made before those ids were kept, the scope query it replaces gives the same numbers."""

from __future__ import annotations

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.evaluate.budget import training_cost
from surfdiff_core.stages import evaluate, rss, sample, train
from surfdiff_core.stages.common import model_registry, open_study_store
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow

WINDOW = 0.1  # eV above each composition's lowest: drops some of the RSS minima from the training set


def test_the_model_carries_its_data_cost_and_the_evaluation_charges_it(tmp_path):
    path = tmp_path / "cost.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store"))
                    .replace("energy_window: 5.0", f"energy_window: {WINDOW}"))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        planned = rss.run(cfg, store, progress=False)
        model = train.run(cfg, store, planned, progress=False)
        with model_registry(cfg) as registry:
            record = registry.get(model.model_id)
        # every relaxation of the RSS run, also those the window dropped; the trainer's ids are what it kept
        assert record.data_cost_ids == model.data_cost_ids == sorted(planned.doc_ids)
        kept, charged = set(model.training_doc_ids), set(model.data_cost_ids)
        assert kept < charged
        docs = {d.doc_id: d for d in store.find({"doc_id": {"$in": sorted(charged)}})}
        lowest = {}
        for d in docs.values():
            if d.valid and d.in_box and d.energy is not None:
                lowest[d.composition] = min(lowest.get(d.composition, d.energy), d.energy)
        windowed = {i for i, d in docs.items() if d.valid and d.in_box and d.energy is not None
                    and d.energy > lowest[d.composition] + WINDOW}
        assert windowed and windowed <= charged - kept  # dropped by the window, charged all the same

        # the same numbers by id as by the legacy scope query (a record without data_cost_ids)
        by_ids = evaluate.model_training_docs(cfg, store, record)
        by_scope = evaluate.model_training_docs(cfg, store, record.model_copy(update={"data_cost_ids": []}))
        assert sorted(d.doc_id for d in by_ids) == sorted(d.doc_id for d in by_scope) == sorted(charged)
        assert training_cost(by_ids) == training_cost(by_scope)
        samples = sample.run(cfg, store, model, progress=False)
        ids_result = evaluate.run(cfg, store, samples, progress=False)
        cost = ids_result.training_cost
        assert cost["structures"] == len(docs) == 8
        assert cost["force_calls"] == sum((d.steps or 0) + 1 for d in docs.values())
        assert cost["atom_steps"] == sum(((d.steps or 0) + 1) * len(d.structure["sites"]) for d in docs.values())
        with model_registry(cfg) as registry:  # the record as it was stored before the field existed
            registry.record(record.model_copy(update={"data_cost_ids": []}))
        legacy = evaluate.run(cfg, store, samples, progress=False)
        assert legacy.training_cost == cost and legacy.all_in == ids_result.all_in
        # the ids, not the scope: a relaxation the training cell gains after training is not the model's cost
        with model_registry(cfg) as registry:
            registry.record(record)
        extra = next(iter(docs.values())).model_copy(update={"doc_id": "rss-after-training", "steps": 99})
        store.put(extra)
        assert evaluate.run(cfg, store, samples, progress=False).training_cost == cost
        assert len(evaluate.model_training_docs(cfg, store, record.model_copy(update={"data_cost_ids": []}))) == 9


def test_training_learns_from_the_rss_result_it_is_given_not_the_whole_cell(tmp_path):
    """The RSS stage's result fixes the data by id: documents of the training cell no result handed on (another
    `surfdiff rss` run of the study, here a larger one) join `surfdiff train` alone, never a train given the result."""
    path = tmp_path / "ids.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        small = rss.run(cfg, store, progress=False)
        larger = rss.run(cfg, store, n=cfg.rss.n + 4, progress=False)
        extra = set(larger.doc_ids) - set(small.doc_ids)
        assert len(extra) == 4 and set(small.doc_ids) < set(larger.doc_ids)
        given = train.run(cfg, store, small, epochs=1, progress=False)
        alone = train.run(cfg, store, epochs=1, progress=False)
    assert set(given.training_doc_ids) <= set(small.doc_ids) and given.data_cost_ids == sorted(small.doc_ids)
    assert set(alone.training_doc_ids) & extra  # the scope: every document of the cell
    assert given.model_id != alone.model_id  # other data, another model
