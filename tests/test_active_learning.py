"""Active learning: rounds label the best distinct samples, fine-tune on them, resume, and stop at the budget."""

from __future__ import annotations

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages import active, evaluate, rss, sample, train
from surfdiff_core.stages.common import model_registry, open_study_store, training_system
from surfdiff_core.train.checkpoint import load_checkpoint
from tests.conftest import TINY_CONFIG


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "al.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store"))
                    + "active_learning: {rounds: 2, relax_per_round: 2, epochs: 2}\n")
    cfg = load_config(path)
    store = open_study_store(cfg).connect()
    first = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
    yield cfg, store, first
    store.close()


def test_rounds_label_samples_and_fine_tune_on_them(study):
    cfg, store, first = study
    # the RSS baseline in the target cell exists before learning: it must never become training data
    drawn_first = sample.run(cfg, store, first, progress=False)
    baseline = evaluate.run(cfg, store, drawn_first, progress=False)
    assert baseline.targets[0].rss_ids
    res = active.run(cfg, store, first, progress=False)
    assert [r["round"] for r in res.rounds] == [1, 2] and res.relaxations == 4
    assert all(r["labels"] == 2 for r in res.rounds)
    trained_on = set(load_checkpoint(res.model.checkpoint).meta["data"]["doc_ids"])
    labels = {d.doc_id: d for d in store.find({"meta.active_learning": True})}
    assert len(labels) == 4 and set(labels) <= trained_on  # both rounds' labels are training data
    assert not trained_on & set(baseline.targets[0].rss_ids)
    assert {d.source for d in store.find({"doc_id": {"$in": sorted(trained_on)}})} == {"rss", "relaxed"}
    round1 = set(load_checkpoint(_checkpoint(cfg, res.rounds[0]["model_id"])).meta["data"]["doc_ids"])
    assert {i for i in round1 if i in labels} == {i for i, d in labels.items() if d.meta["round"] == 1}
    for d in labels.values():  # labelled with the oracle from a sample of the model before that round
        assert d.energy_model == "emt" and d.parent_id.startswith("generated-") and d.trajectory == []
        assert store.get(d.doc_id).trajectory  # frames (for the MLFF) live beside the document
    with model_registry(cfg) as registry:
        rounds = {r.model_id: r.round for r in registry.find(study=cfg.name)}
        child = registry.get(res.model.model_id)
    assert rounds[first.model_id] is None and rounds[res.model.model_id] == 2
    # fine-tuned on the same RSS data: each round carries the first model's training-data cost forward, by id
    assert len(first.data_cost_ids) == 8 and child.data_cost_ids == res.model.data_cost_ids == first.data_cost_ids
    # a rerun (after a kill, say) repeats nothing and ends on the same model
    n = store.count({})
    again = active.run(cfg, store, first, progress=False)
    assert store.count({}) == n and again.model.model_id == res.model.model_id
    # the evaluation counts the labels as training-data cost
    after = evaluate.run(cfg, store, sample.run(cfg, store, res.model, progress=False), progress=False)
    cost = after.training_cost
    assert cost["active_learning_labels"] == 4
    # the labels were oracle relaxations in the target cell: the generative arm spent them before its own
    t = after.targets[0]
    in_cell = sorted((d for d in labels.values() if d.system_id == t.system_id),
                     key=lambda d: (d.meta["round"], d.meta["mlff_energy"], d.doc_id))
    assert t.active_learning_labels == len(in_cell) == 4
    assert t.generative_energies[:4] == pytest.approx([d.energy for d in in_cell])
    assert len(t.generative_energies) == 4 + len(t.relaxed_ids)
    # no oracle relaxation is spent again on a structure already labelled: make one label the top sample
    drawn = sample.run(cfg, store, res.model, progress=False)
    first_pick = store.get(after.targets[0].relaxed_ids[0]).parent_id
    top, label = store.get(first_pick), in_cell[0]
    store.put(top.model_copy(update={"doc_id": label.doc_id, "source": "relaxed", "energy_model": "emt",
                                     "parent_id": label.parent_id, "energy": label.energy, "meta": label.meta}))
    again = evaluate.run(cfg, store, drawn, progress=False).targets[0]
    assert again.active_learning_labels == 4 and first_pick not in {
        store.get(i).parent_id for i in again.relaxed_ids}
    # the model before any round learned from no label, and its evaluation counts none; without the sample
    # stage's result it judges the samples the config's sample section makes, not those the rounds drew
    alone = evaluate.run(cfg, store, model_id=first.model_id, progress=False).targets[0]
    assert alone.active_learning_labels == 0 and alone.relaxed_ids
    assert {store.get(i).parent_id for i in alone.relaxed_ids} <= set(drawn_first.targets[0].doc_ids)
    round_one = store.get(next(d.parent_id for d in labels.values() if d.meta["round"] == 1))
    assert round_one.model_id == first.model_id and round_one.doc_id not in drawn_first.targets[0].doc_ids
    named = evaluate.run(cfg, store, model_id=first.model_id, sample_run=round_one.run_id, progress=False).targets[0]
    assert {store.get(store.get(i).parent_id).run_id for i in named.relaxed_ids} == {round_one.run_id}
    with pytest.raises(SurfdiffError, match="sample run 'nope'"):
        evaluate.run(cfg, store, model_id=first.model_id, sample_run="nope", progress=False)
    assert cost["structures"] == len([d for d in store.find({"study": cfg.name, "source": "rss",
                                                             "system_id": training_system(cfg).system_id})]) + 4


def test_two_chains_in_one_study_keep_their_labels_apart(study):
    """Two active-learning runs from one model (other sampling settings) share the study's store: each
    round trains on its own chain's labels only, and each evaluation counts only its own."""
    cfg, store, first = study
    one = active.run(cfg, store, first, progress=False)
    other_cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"seed": cfg.sample.seed + 1})})
    two = active.run(other_cfg, store, first, progress=False)
    assert one.model.model_id != two.model.model_id
    own = {name: set(res.model.learned_labels) for name, res in (("one", one), ("two", two))}
    assert len(own["one"]) == len(own["two"]) == 4 and not own["one"] & own["two"]
    assert store.count({"meta.active_learning": True}) == 8
    for name, res in (("one", one), ("two", two)):
        data = set(load_checkpoint(res.model.checkpoint).meta["data"]["doc_ids"])
        labels_seen = {i for i in data if store.get(i).meta.get("active_learning")}
        assert labels_seen == own[name], name
        run_cfg = cfg if name == "one" else other_cfg
        evaluated = evaluate.run(run_cfg, store, sample.run(run_cfg, store, res.model, progress=False),
                                 progress=False)
        assert evaluated.training_cost["active_learning_labels"] == 4, name


def _checkpoint(cfg, model_id: str) -> str:
    with model_registry(cfg) as registry:
        return registry.get(model_id).checkpoint


def test_the_loop_stops_at_its_budget(study):
    cfg, store, first = study
    cfg = cfg.model_copy(update={"active_learning": cfg.active_learning.model_copy(
        update={"rounds": 5, "max_relaxations": 3})})
    res = active.run(cfg, store, first, progress=False)
    assert res.relaxations == 3 and [r["labels"] for r in res.rounds] == [2, 1]


def test_rounds_explore_around_their_best_label(study):
    """active_learning.explore: from round 2 on, samples seeded at the target's best oracle label compete for the
    round's labels; round 1 has no label to start from."""
    cfg, store, first = study
    cfg = cfg.model_copy(update={"active_learning": cfg.active_learning.model_copy(update={"explore": 3})})
    res = active.run(cfg, store, first, progress=False)
    assert [r["explored"] for r in res.rounds] == [0, 3]
    round1 = [d for d in store.find({"doc_id": {"$in": list(res.rounds and res.model.learned_labels)}})
              if d.meta.get("round") == 1 and d.source == "relaxed" and d.energy is not None]
    best = min(round1, key=lambda d: d.energy)
    seeded = [d for d in store.find({"source": "generated", "study": cfg.name})
              if (d.meta.get("seed_structure") or {}).get("source") == best.doc_id]
    assert len(seeded) == 3
    assert all(d.meta["seed_structure"]["t0"] == cfg.sample.t0 for d in seeded)
    assert len({d.doc_id for d in seeded}) == 3
