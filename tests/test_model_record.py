"""The training stage's result and the model registry's record describe one model: the fields they share are
handed across in one place (TrainResult.from_record / to_record), every other field is named as the one side's
own, and stored registry documents read and write back as before."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from surfdiff_core.config import StoreConfig, load_config
from surfdiff_core.stages.results import MODEL_FIELDS, REGISTRY_ONLY, RUN_ONLY, StageResult, TrainResult
from surfdiff_core.store.models import ModelRecord, ModelRegistry
from tests.conftest import TINY_CONFIG

# A registry document exactly as the registry has stored it (ModelRecord.model_dump(mode="json") + updated_at).
STORED = {
    "model_id": "model-0123456789ab", "checkpoint": "/data/checkpoints/model-0123456789ab.pt", "sha256": "ab" * 32,
    "study": "tiny", "system_id": "Ag-fcc111-p(2x2)-a4.06-l2-f1-v7-z0.5-4.0", "energy_models": ["emt"],
    "epochs": 3, "best_val": 1.25, "n_train": 14, "n_val": 2,
    "model": {"n_features": 8, "n_rbf": 8}, "train": {"epochs": 3, "seed": 0}, "round": 2,
    "learned_labels": ["relaxed-aa", "single_point-bb"], "committee": ["model-member1"], "member_of": None,
    "pretrained": "emt-ag111-o", "data_cost_ids": ["rss-aa", "rss-bb"],
    "created_at": "2024-05-01T10:00:00+00:00", "updated_at": "2024-05-02T10:00:00+00:00",
}
# ... and one recorded before learned labels, committees, membership, pretrained models, rounds and data cost ids
OLD = {k: v for k, v in STORED.items()
       if k not in ("learned_labels", "committee", "member_of", "pretrained", "round", "best_val", "data_cost_ids")}


def test_every_field_of_either_side_is_shared_or_named_as_its_own():
    record = set(ModelRecord.model_fields)
    result = {f.name for f in fields(TrainResult)}
    stage = {f.name for f in fields(StageResult)}
    assert set(MODEL_FIELDS) == (record & result) - stage  # handed across: what both carry
    assert record == set(MODEL_FIELDS) | REGISTRY_ONLY | {"study"}, "a registry field no result carries nor names"
    assert result == set(MODEL_FIELDS) | RUN_ONLY | stage, "a result field the registry neither records nor names"
    assert not (REGISTRY_ONLY & result) and not (RUN_ONLY & record)


def test_a_record_and_its_result_round_trip():
    rec = ModelRecord.model_validate(STORED)
    res = TrainResult.from_record(rec, run_id="run-1", config_hash="hash-1")
    assert (res.study, res.run_id, res.config_hash) == ("tiny", "run-1", "hash-1")
    for name in MODEL_FIELDS:
        assert getattr(res, name) == getattr(rec, name), name
    assert res.committee is not rec.committee  # the result's lists are its own
    back = res.to_record(**{k: getattr(rec, k) for k in REGISTRY_ONLY})
    assert back.model_dump(mode="json") == rec.model_dump(mode="json")
    # run-only numbers stay on the result; a study named for the run wins over the record's (None for shipped)
    res = TrainResult.from_record(rec.model_copy(update={"study": None}), study="other", run_id="r", config_hash="",
                                  resumed_from=4, history=[{"loss": 1.0}])
    assert (res.study, res.resumed_from, res.history) == ("other", 4, [{"loss": 1.0}])
    with pytest.raises(TypeError):
        TrainResult.from_record(rec, run_id="r", config_hash="", round=3)  # a registry field is not a run field


def test_old_and_current_registry_documents_load_and_write_back_unchanged(tmp_path):
    cfg = StoreConfig(backend="sqlite", path=str(tmp_path / "store"))
    with ModelRegistry(cfg) as registry:
        registry._store.update([STORED, {**OLD, "model_id": "model-old"}], key="model_id")
        old = registry.get("model-old")
        res = TrainResult.from_record(old, run_id="r", config_hash="")
        assert res.best_val == 0.0 and res.committee == [] and res.learned_labels == []  # the result's defaults
        assert old.data_cost_ids == [] and res.data_cost_ids == []  # the evaluation's legacy path: by scope
        assert old.best_val is None and old.pretrained is None and old.round is None
        rec = registry.get(STORED["model_id"])
        again = TrainResult.from_record(rec, run_id="r", config_hash="").to_record(
            **{k: getattr(rec, k) for k in REGISTRY_ONLY})
        registry.record(again)
        stored = registry._store.query_one({"model_id": STORED["model_id"]})
    keep = {k: v for k, v in stored.items() if k not in ("_id", "updated_at", "last_updated")}
    assert json.dumps(keep, sort_keys=True) == json.dumps(
        {k: v for k, v in STORED.items() if k != "updated_at"}, sort_keys=True)


@pytest.mark.slow
def test_training_result_is_its_registry_record_plus_the_run(tmp_path):
    from surfdiff_core.stages import rss, sample, train
    from surfdiff_core.stages.common import model_registry, open_study_store

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")))
    cfg = load_config(path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    with open_study_store(cfg) as store:
        res = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False, run_id="run-t")
    with model_registry(cfg) as registry:
        rec = registry.get(res.model_id)
    for name in MODEL_FIELDS:
        assert getattr(res, name) == getattr(rec, name), name
    assert res.study == rec.study == cfg.name and res.run_id == "run-t" and res.history and res.training_doc_ids
    # the model as an upstream when no training ran: the same record, seen as a result
    upstream = sample.registered_model(cfg, "run-u")
    assert upstream.run_id == "run-u" and upstream.config_hash == ""
    assert all(getattr(upstream, n) == getattr(rec, n) for n in MODEL_FIELDS)
    # a result the registry does not know: sampling trusts its own hash, as a record of the same fields
    other = TrainResult.from_record(rec.model_copy(update={"model_id": "model-unregistered"}), run_id="x",
                                    config_hash="")
    seen = sample.resolve_model(cfg, other)
    assert seen.model_id == "model-unregistered"
    assert all(getattr(seen, n) == getattr(other, n) for n in MODEL_FIELDS)
