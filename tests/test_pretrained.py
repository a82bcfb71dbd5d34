"""Shipped pretrained models: their hashes, offline loading, refusal where they do not fit, fine-tuning."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from surfdiff_core import pretrained
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store.models import file_sha256

SHIPPED = ("emt-ag111-o", "chgnet-ag111-o")

# the shipped EMT model's system (configs/pretrained/emt-ag111-o.yaml), with a small RSS in a small cell
STUDY = """
name: {name}
substrate: {{element: {element}, facet: {facet}, lattice_constant: auto, layers: 3, fixed_layers: 1, vacuum: 8}}
confinement: {{z_min: 0.5, z_max: {z_max}}}
oracle: {{name: {oracle}}}
rss: {{cell: p(2x2), compositions: [Ag2O1], n: 4, fmax: 0.3, steps: 30, seed: 3, workers: 1}}
model: {{n_features: {features}, n_rbf: 20, n_interactions: 3, cutoff: 5.0}}
train: {{epochs: 1, batch_size: 4, repeat: 1, lr: 1.0e-7, lr_min: 1.0e-8, ensemble: 2, init_from: {init}}}
sample:
  targets: [{{cell: "p(2x2)", composition: Ag2O1}}]
  n: 4
  steps: 20
  relax_steps: 5
relax: {{method: emt, top_k: 1}}
store: {{backend: sqlite, path: {store}}}
"""


def study(tmp_path, name="ft", *, element="Ag", facet="fcc111", z_max=5.5, oracle="emt", features=32,
          init="emt-ag111-o"):
    from surfdiff_core.config import load_config

    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, element=element, facet=facet, z_max=z_max, oracle=oracle,
                                 features=features, init=init, store=tmp_path / "data" / "store"))
    return path, load_config(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoints_match_their_cards(name):
    from surfdiff_core.train.checkpoint import load_checkpoint

    card = pretrained.find_shipped(name)
    assert card is not None, f"{name} is not shipped"
    pretrained.verify(card)
    for entry in (card.checkpoint, *card.committee):
        path = card.path(entry)
        assert file_sha256(path) == entry.sha256
        assert path.stat().st_size < 2_000_000  # a few MB in all
        loaded = load_checkpoint(path)
        assert loaded.model_id == entry.model_id
        symbols = sorted(pretrained_symbols(loaded.model.spec.elements))
        assert symbols == sorted(card.elements)
    assert card.training_data["force_calls"] > card.training_data["structures"] > 0
    assert len(card.committee) == card.train["ensemble"] - 1
    assert pretrained.find_shipped(card.checkpoint.model_id) == card  # by id as well as by name


def pretrained_symbols(numbers):
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in numbers]


def test_a_damaged_checkpoint_is_refused(tmp_path, monkeypatch):
    card = pretrained.find_shipped("emt-ag111-o")
    shutil.copytree(card.folder, tmp_path / card.name)
    monkeypatch.setattr(pretrained, "SHIPPED_DIR", tmp_path)
    copy = pretrained.find_shipped("emt-ag111-o")
    target = copy.path(copy.committee[0])
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(SurfdiffError, match="SHA-256"):
        pretrained.verify(copy)
    target.unlink()
    with pytest.raises(SurfdiffError, match="missing"):
        pretrained.verify(copy)


def test_sampling_with_a_shipped_model_registers_it_and_reaches_no_network(tmp_path, monkeypatch, lattice_cache):
    from surfdiff_core.stages import sample
    from surfdiff_core.stages.common import model_registry, open_study_store

    _, cfg = study(tmp_path, init="null")
    loads = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(torch, "load", checked_load)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with open_study_store(cfg) as store:
        res = sample.run(cfg, store, model_id="emt-ag111-o", progress=False)
    card = pretrained.find_shipped("emt-ag111-o")
    assert res.model_id == card.checkpoint.model_id
    assert res.targets[0].n == 4 and res.targets[0].n_valid >= 1
    assert loads and all(w is True for w in loads)
    with model_registry(cfg) as registry:
        rec = registry.get(card.checkpoint.model_id)
        members = [registry.get(m.model_id) for m in card.committee]
    assert rec.pretrained == "emt-ag111-o" and rec.study is None
    assert rec.committee == [m.model_id for m in card.committee]
    assert all(m is not None and m.member_of == rec.model_id for m in members)


def test_a_shipped_model_registered_by_another_install_is_found_in_this_one(tmp_path, lattice_cache):
    """The registry names the checkpoint of the install that registered it; a new virtual environment reading
    the same store finds its own copy (still checked by SHA-256). A trained model's missing file stays an error."""
    from surfdiff_core.stages.common import model_registry
    from surfdiff_core.stages.sample import committee_records, resolve_model

    _, cfg = study(tmp_path, init="null")
    card = pretrained.find_shipped("emt-ag111-o")
    main = pretrained.register(card, cfg)
    elsewhere = "/old/venv/lib/python3.11/site-packages/surfdiff_core/pretrained/emt-ag111-o"
    with model_registry(cfg) as registry:
        for entry in (card.checkpoint, *card.committee):
            rec = registry.get(entry.model_id)
            registry.record(rec.model_copy(update={"checkpoint": f"{elsewhere}/{entry.file}"}))
        registry.record(main.model_copy(update={"model_id": "trained", "pretrained": None, "committee": [],
                                               "checkpoint": f"{elsewhere}/{card.checkpoint.file}"}))
    rec = resolve_model(cfg, model_id=card.checkpoint.model_id)
    assert rec.checkpoint == str(card.path(card.checkpoint))
    assert [m.checkpoint for m in committee_records(cfg, rec)] == [str(card.path(m)) for m in card.committee]
    with pytest.raises(SurfdiffError, match="checkpoint of model trained is missing"):
        resolve_model(cfg, model_id="trained")


@pytest.mark.parametrize(("change", "phrase"), [
    ({"element": "Cu", "facet": "fcc100"}, "substrate Cu(fcc100), not Ag(fcc111)"),
    ({"oracle": "chgnet"}, "energy model chgnet, not emt"),
    ({"z_max": 4.0}, "box 0.5-4 Å, not 0.5-5.5 Å"),
])
def test_a_shipped_model_for_another_system_is_refused_in_one_line(tmp_path, capsys, lattice_cache, change, phrase):
    from flows.cli import main

    path, _ = study(tmp_path, init="null", **change)
    (tmp_path / "data" / "store").mkdir(parents=True)
    rc = main(["sample", str(path), "--model-id", "emt-ag111-o"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "does not fit" in err and phrase in err


def test_fine_tuning_needs_the_models_architecture(tmp_path, lattice_cache):
    from surfdiff_core.stages.train import initial_model

    _, cfg = study(tmp_path, features=16)
    with pytest.raises(SurfdiffError, match=r"model section differs in n_features \(16 vs 32\)"):
        initial_model(cfg)
    _, cfg = study(tmp_path, "other", init="no-such-model")
    with pytest.raises(SurfdiffError, match="neither a shipped pretrained model"):
        initial_model(cfg)


def test_fine_tuning_starts_from_the_shipped_weights(tmp_path, lattice_cache):
    from surfdiff_core.stages import rss, train
    from surfdiff_core.stages.common import model_registry, open_study_store

    _, cfg = study(tmp_path)
    card = pretrained.find_shipped("emt-ag111-o")
    with open_study_store(cfg) as store:
        rss.run(cfg, store, progress=False)
        res = train.run(cfg, store, progress=False)
    assert res.model_id != card.checkpoint.model_id
    assert len(res.committee) == 1
    with model_registry(cfg) as registry:
        rec, member = registry.get(res.model_id), registry.get(res.committee[0])
    assert rec.pretrained == member.pretrained == "emt-ag111-o"
    for tuned_path, entry in ((rec.checkpoint, card.checkpoint), (member.checkpoint, card.committee[0])):
        tuned = torch.load(tuned_path, weights_only=True)
        shipped = torch.load(card.path(entry), weights_only=True)["state_dict"]
        assert tuned["data"]["parent"] == entry.model_id
        normalisation = ("atomref", "energy_shift", "energy_scale")
        weights = [k for k in shipped if not k.endswith(normalisation)]
        # a learning rate of 1e-7 for one epoch: still the shipped weights, not a fresh initialisation
        assert max(float((tuned["state_dict"][k] - shipped[k]).abs().max()) for k in weights) < 1e-4


def test_evaluation_charges_the_shipped_training_data():
    from surfdiff_core.stages.evaluate import pretrained_training

    cost, shipped = pretrained_training("emt-ag111-o")
    card = pretrained.find_shipped("emt-ag111-o")
    assert cost["atom_force_calls"] == card.training_data["atom_force_calls"] > 0
    assert shipped["name"] == "emt-ag111-o"
    assert pretrained_training(None) == (None, None)


def test_models_command_lists_shipped_and_registered(tmp_path, capsys, lattice_cache):
    from flows.cli import main

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in rows["shipped"]}
    assert set(SHIPPED) <= set(names)
    assert all(r["checkpoints"] == "ok" for r in names.values())
    path, cfg = study(tmp_path, init="null")
    pretrained.register(pretrained.find_shipped("emt-ag111-o"), cfg)
    assert main(["models", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[shipped, is emt-ag111-o]" in out and "(shipped)" in out


def test_the_shipped_chgnet_model_samples_the_papers_target_without_training(tmp_path):
    """Ag12O6 in p(4x4) from chgnet-ag111-o directly; the lattice constant given (the card's), so that no CHGNet
    bulk relaxation runs here."""
    from surfdiff_core.config import load_config
    from surfdiff_core.stages import sample
    from surfdiff_core.stages.common import open_study_store

    card = pretrained.find_shipped("chgnet-ag111-o")
    path = tmp_path / "paper.yaml"
    path.write_text(STUDY.format(name="paper", element="Ag", facet="fcc111", z_max=5.5, oracle="chgnet", features=32,
                                 init="null", store=tmp_path / "data" / "store")
                    .replace("lattice_constant: auto", f"lattice_constant: {card.system.lattice_constant}")
                    .replace('{cell: "p(2x2)", composition: Ag2O1}', '{cell: "p(4x4)", composition: Ag12O6}'))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        res = sample.run(cfg, store, model_id="chgnet-ag111-o", progress=False)
    (target,) = res.targets
    assert (target.composition, target.cell, target.n) == ("Ag12O6", "p(4x4)", 4)
    assert target.n_valid >= 2  # the card's measurement: most samples valid
    assert res.model_id == card.checkpoint.model_id
