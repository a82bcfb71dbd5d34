"""The generative core end to end on a tiny EMT study: RSS -> train -> sample -> relax (no Prefect)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from surfdiff_core.config import SampleTarget, load_config
from surfdiff_core.sample.generate import generate
from surfdiff_core.stages import relax, rss, sample, train
from surfdiff_core.stages.common import open_study_store, target_system
from surfdiff_core.train.checkpoint import load_checkpoint
from surfdiff_core.train.trainer import _losses, make_model, make_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import TINY_CONFIG

    d = tmp_path_factory.mktemp("pipe")
    path = d / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(d / "data" / "store")))
    cfg = load_config(path)
    store = open_study_store(cfg).connect()
    rss.run(cfg, store, progress=False)
    summary = train.run(cfg, store, progress=False)
    yield cfg, store, summary
    store.close()


def test_training_writes_a_loadable_checkpoint_with_provenance(trained):
    cfg, store, summary = trained
    assert summary.epochs == 3
    loaded = load_checkpoint(summary.checkpoint)
    assert loaded.model_id == summary.model_id
    usable = {d.doc_id for d in store.find({"source": "rss", "valid": True, "in_box": True})}
    assert loaded.meta["data"]["n_structures"] == len(usable) >= 6
    assert set(loaded.meta["data"]["doc_ids"]) == usable
    # checkpoint round trip gives identical outputs
    again = load_checkpoint(summary.checkpoint)
    system = target_system(cfg, SampleTarget(cell="p(2x2)", composition="Ag1O1"))
    from surfdiff_core.geometry.batch import collate

    atoms = system.random_structure(np.random.default_rng(0))
    batch = collate([atoms], [system.movable], [system.z_box])
    t = torch.tensor([0.3])
    a = loaded.model(batch, t, score=True, energy=True, forces=True)
    b = again.model(batch, t, score=True, energy=True, forces=True)
    assert torch.equal(a.eps, b.eps) and torch.equal(a.energy, b.energy) and torch.equal(a.forces, b.forces)


def test_training_reports_how_valid_its_samples_are(trained):
    from surfdiff_core.stages.train import VALIDITY_WARNING

    _, _, summary = trained
    assert summary.sample_validity is not None and 0.0 <= summary.sample_validity <= 1.0
    assert (summary.warning is not None) == (summary.sample_validity < VALIDITY_WARNING)
    if summary.warning:
        assert "test samples of Ag2O1 p(3x3) are valid" in summary.warning


def test_training_resumes_from_its_checkpoint(trained):
    cfg, store, summary = trained
    from surfdiff_core.stages.common import checkpoint_dir, training_system
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import train as train_model

    scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id, energy_models=("emt",))
    res = train_model(store, cfg.model, cfg.train, scope=scope, checkpoint_dir=checkpoint_dir(cfg), progress=False)
    assert res.model_id == summary.model_id
    assert res.resumed_from == 3 and res.epochs == 3  # nothing left to do: finished run reused


def test_finished_model_is_reused_without_its_resume_state(trained):
    """Deleting `<model>-last.pt` (the optimizer state) after a finished run must not retrain the model."""
    cfg, store, summary = trained
    from surfdiff_core.stages.common import checkpoint_dir, training_system
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import train as train_model

    scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id, energy_models=("emt",))
    best = Path(summary.checkpoint)
    last = best.with_name(f"{best.stem}-last.pt")
    aside = last.with_suffix(".aside")
    before = best.read_bytes()
    os.replace(last, aside)
    try:
        res = train_model(store, cfg.model, cfg.train, scope=scope, checkpoint_dir=checkpoint_dir(cfg),
                          progress=False)
        assert not last.exists()  # nothing trained, so no new resume state either
        assert res.model_id == summary.model_id and res.checkpoint == best
        assert res.resumed_from == 3 and res.epochs == 3 and res.best_val == summary.best_val
        assert best.read_bytes() == before  # the registered file (and its sha256) unchanged
        longer = train_model(store, cfg.model, cfg.train, scope=scope, checkpoint_dir=checkpoint_dir(cfg),
                             progress=False, max_epochs=4)  # more epochs than it ran: trained, not reused
        assert longer.resumed_from == 0 and longer.epochs == 4
    finally:
        os.replace(aside, last)
        best.write_bytes(before)


def test_tiny_dataset_is_overfit(trained):
    """Fixed noise and frames: the combined loss must fall by at least an order of magnitude."""
    cfg, store, _ = trained
    from surfdiff_core.stages.common import training_system
    from surfdiff_core.train.data import DataScope, element_reference_energies, load_samples

    scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id, energy_models=("emt",))
    samples, _ = load_samples(store, scope, cfg.train.model_copy(update={"repeat": 1}))
    samples = samples[:2]
    elements = sorted({int(z) for s in samples for z in s.atoms.numbers})
    torch.manual_seed(0)
    model = make_model(cfg.model.model_copy(update={"n_features": 16}), elements)
    mu, std = element_reference_energies(samples, elements)
    model.set_energy_normalisation(dict(zip(elements, mu.tolist(), strict=True)), std)
    process = make_process(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = last = None
    for _ in range(250):
        gen = torch.Generator().manual_seed(1)
        rng = np.random.default_rng(1)
        losses = _losses(model, process, samples, cfg.train, torch.device("cpu"), gen, rng, create_graph=True,
                         force_scale=1.0)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first if first is not None else float(losses["loss"].detach())
        last = float(losses["loss"].detach())
    assert last < first / 10


def test_sampling_into_a_larger_cell(trained):
    cfg, store, summary = trained
    target = SampleTarget(cell="p(3x3)", composition="Ag2O1")
    res = sample.run(cfg, store, summary, targets=[target], run_id="test", progress=False)
    s = res.targets[0]
    assert s.n == 4 and 0.0 <= s.rejection_rate <= 1.0 and res.model_id == summary.model_id
    docs = list(store.find({"source": "generated", "run_id": "test"}))
    assert len(docs) == 4
    system = target_system(cfg, target)
    for d in docs:
        atoms = d.to_atoms()
        np.testing.assert_allclose(atoms.positions[: system.n_substrate], system.template.positions, atol=1e-4)
        assert system.inside_box(atoms, tol=1e-3).all()
        assert d.model_id == summary.model_id and d.meta["sampler"] == "em" and d.meta["diffusion_steps"] == 10
        assert d.cell == "p(3x3)" and d.composition == "Ag2O1" and d.study == "tiny"
    assert sorted(d.doc_id for d in docs) == sorted(s.doc_ids)
    # sampling again with the same settings reuses the documents (no duplicates); the registry finds the model
    again = sample.run(cfg, store, targets=[target], run_id="test", progress=False)
    assert again.model_id == summary.model_id
    assert store.count({"source": "generated"}) == 4


def test_guided_samples_have_lower_mlff_energy(trained):
    """Guidance follows the MLFF's own forces, so from the same seed it must end lower in MLFF energy.
    An untrained model scaled to forces of order 1 eV/Å (the 3-epoch one is too flat to show it)."""
    cfg, _, summary = trained
    from surfdiff_core.train.checkpoint import LoadedModel

    torch.manual_seed(0)
    model = make_model(cfg.model, [8, 47])
    model.set_energy_normalisation({8: -1.0, 47: -2.0}, 100.0)
    loaded = LoadedModel(model=model.eval(), process=make_process(cfg.model), model_id="random", meta={})
    system = target_system(cfg, SampleTarget(cell="p(3x3)", composition="Ag2O1"))
    # The deterministic ODE sampler isolates guidance from the SDE noise of the last steps (few steps here);
    # the overlap wall is off: it follows its own energy, not the MLFF's.
    base = cfg.sample.model_copy(update={"relax": False, "steps": 20, "n": 8, "batch_size": 8, "eta_dt": 0.01,
                                         "sampler": "ode", "repulsion": 0.0})
    guided = generate(loaded, system, base.model_copy(update={"guidance": True}), seed=3, progress=False)
    unguided = generate(loaded, system, base.model_copy(update={"guidance": False}), seed=3, progress=False)
    lower = np.asarray(guided.energies) < np.asarray(unguided.energies)
    assert np.mean(guided.energies) < np.mean(unguided.energies)
    assert lower.all(), lower


def test_relax_best_candidates_with_emt(trained):
    cfg, store, summary = trained
    cands = relax.select_candidates(cfg, store, top_k=1)
    assert len(cands) == 1
    s = relax.run(cfg, store, candidates=cands, run_id="test")
    assert s.relaxed + s.failed == 1
    rel = list(store.find({"source": "relaxed"}))
    assert len(rel) == 1 and rel[0].parent_id == cands[0].doc_id
    if not rel[0].error:
        assert rel[0].energy is not None and rel[0].oracle == "emt"
    again = relax.run(cfg, store, candidates=cands, run_id="test")
    assert again.skipped == 1 and store.count({"source": "relaxed"}) == 1


def test_energy_target_is_refused_for_an_unconditioned_model(trained):
    from surfdiff_core.errors import ConfigError

    cfg, store, summary = trained
    n = store.count({})
    scfg = cfg.sample.model_copy(update={"energy_target": 0.0})
    with pytest.raises(ConfigError, match="energy-conditioned model"):
        sample.run(cfg, store, summary, scfg=scfg, run_id="refused", progress=False)
    assert store.count({}) == n  # nothing written


def test_overlap_wall_joins_sample_ids_only_when_on(trained):
    """Samples drawn without the wall keep the ids they had before it existed; with it they are new documents,
    and the wall really acts: no sample drawn with it has a pair inside 1 Å."""
    from surfdiff_core.sample.generate import generated_doc_id
    from surfdiff_core.store import make_doc_id

    cfg, _, summary = trained
    loaded = load_checkpoint(summary.checkpoint)
    system = target_system(cfg, SampleTarget(cell="p(3x3)", composition="Ag2O1"))
    off = cfg.sample.model_copy(update={"repulsion": 0.0})
    legacy = make_doc_id("generated", loaded.model_id, system.system_id, system.composition, off.sampler, off.steps,
                         True, off.eta_dt, off.relax, off.relax_steps, off.batch_size, 5, 0)
    assert generated_doc_id(loaded.model_id, system, off, 5, 0) == legacy
    on = cfg.sample.model_copy(update={"repulsion": 0.75, "n": 8, "batch_size": 8})
    assert generated_doc_id(loaded.model_id, system, on, 5, 0) != legacy
    res = generate(loaded, system, on, seed=5, progress=False)
    assert all(res.valid), res.reasons


def test_inpainting_from_a_store_document_through_the_cli(trained, capsys, tmp_path):
    """`surfdiff sample --inpaint-from DOC_ID --fix O`: the O atom of an RSS minimum stays where it was, the Ag atoms
    are generated, the documents say what was fixed; a structure of another substrate is one line, exit 2."""
    from ase.build import fcc111
    from ase.io import write

    from flows.cli import main

    cfg, store, _ = trained
    path = Path(cfg.store.path).parents[1] / "tiny.yaml"
    src = min(store.find({"source": "rss", "composition": "Ag2O1", "valid": True}), key=lambda d: d.energy)
    rc = main(["sample", str(path), "--cell", src.cell, "--composition", "Ag2O1", "--n", "2", "--batch-size", "2",
               "--inpaint-from", src.doc_id, "--fix", "O", "--resample", "2", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    docs = [d for d in store.find({"source": "generated", "composition": "Ag2O1", "cell": src.cell})
            if "inpaint" in d.meta]
    assert len(docs) == 2
    o = src.n_substrate + 2
    for d in docs:
        assert d.meta["inpaint"]["source"] == src.doc_id and d.meta["inpaint"]["fixed_indices"] == [o]
        assert np.allclose(d.to_atoms().positions[o], src.to_atoms().positions[o], atol=1e-8)
        assert not np.allclose(d.to_atoms().positions[o - 2:o], src.to_atoms().positions[o - 2:o], atol=0.05)
    rc = main(["sample", str(path), "--cell", src.cell, "--composition", "Ag2O1", "--n", "2", "--batch-size", "2",
               "--from", src.doc_id, "--t0", "0.05", "--no-relax"])
    capsys.readouterr()
    seeded = [d for d in store.find({"source": "generated", "cell": src.cell}) if "seed_structure" in d.meta]
    assert rc == 0 and len(seeded) == 2 and seeded[0].meta["seed_structure"] == {"source": src.doc_id, "t0": 0.05}
    other = fcc111("Cu", size=(2, 2, 2), vacuum=7.0)
    other.append("O")
    write(tmp_path / "cu.extxyz", other)
    rc = main(["sample", str(path), "--cell", src.cell, "--composition", "Ag2O1", "--inpaint-from",
               str(tmp_path / "cu.extxyz")])
    err = capsys.readouterr().err
    assert rc == 2 and "substrate is not the target's" in err and err.count("\n") == 1, err
