"""Energy-conditioned denoiser (classifier-free guidance on E_diff): exact guidance mixing, equivariance, the
condition carries what the score needs, E_diff from data, and the study runs train -> conditioned sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surfdiff_core.config import load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.ml.models import ModelSpec, SurfaceModel
from tests.test_painn import _rotation, _two_slabs

SPEC = ModelSpec(n_features=16, n_rbf=8, n_interactions=2, cutoff=4.5, elements=[8, 47], time_features=8,
                 energy_features=8)


def _model(seed: int = 0) -> SurfaceModel:
    torch.manual_seed(seed)
    model = SurfaceModel(SPEC).double()
    with torch.no_grad():  # a non-zero null embedding, as after training
        model.energy_condition.null.normal_()
    return model


def _eps(model, batch, condition, cfg_scale=1.0):
    with torch.no_grad():
        return model(batch, 0.4, score=True, condition=condition, cfg_scale=cfg_scale).eps


def test_guidance_mixes_conditional_and_null_scores_exactly():
    model, batch = _model(), _two_slabs()
    cond, null = _eps(model, batch, 0.1), _eps(model, batch, None)
    assert not torch.allclose(cond, null)
    torch.testing.assert_close(_eps(model, batch, math.nan), null)  # NaN is "no condition"
    torch.testing.assert_close(_eps(model, batch, 0.1, cfg_scale=0.0), null)
    torch.testing.assert_close(_eps(model, batch, 0.1, cfg_scale=3.0), null + 3.0 * (cond - null))
    # per-structure conditions: each structure sees its own
    both = _eps(model, batch, torch.tensor([0.1, 0.7], dtype=torch.float64))
    first = batch.batch == 0
    torch.testing.assert_close(both[first], cond[first])
    assert not torch.allclose(both[~first], cond[~first])
    with pytest.raises(ValueError, match="shape"):
        _eps(model, batch, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))


def test_conditioned_score_stays_rotation_equivariant():
    from surfdiff_core.geometry.batch import SlabBatch

    model, batch = _model(), _two_slabs()
    rot = _rotation(np.array([0.3, -1.2, 0.7]), 1.1)
    rotated = SlabBatch(positions=batch.positions @ rot.T, numbers=batch.numbers, cell=batch.cell @ rot.T,
                        batch=batch.batch, movable=batch.movable, z_bounds=batch.z_bounds)
    for scale in (1.0, 2.5):
        torch.testing.assert_close(_eps(model, rotated, 0.2, scale), _eps(model, batch, 0.2, scale) @ rot.T,
                                   rtol=1e-8, atol=1e-10)


def test_unconditioned_model_refuses_a_condition():
    model = SurfaceModel(ModelSpec(**{**SPEC.to_dict(), "energy_features": 0})).double()
    batch = _two_slabs()
    assert model.energy_condition is None
    torch.testing.assert_close(_eps(model, batch, None), _eps(model, batch, math.nan))
    with pytest.raises(ValueError, match="without energy conditioning"):
        _eps(model, batch, 0.1)


def test_condition_carries_what_the_score_needs():
    """One noisy input, two clean structures behind it (E_diff 0 and 0.5): only the condition tells them apart.
    Trained with condition dropout, the conditional scores fit each target and the null score their mean."""
    torch.manual_seed(0)
    model = SurfaceModel(SPEC).double()
    batch = _two_slabs()
    sel = batch.batch == 0
    one = type(batch)(positions=batch.positions[sel], numbers=batch.numbers[sel], cell=batch.cell[:1],
                      batch=batch.batch[sel], movable=batch.movable[sel], z_bounds=batch.z_bounds[:1])
    mov = one.movable
    gen = torch.Generator().manual_seed(1)
    target = {c: torch.randn(int(mov.sum()), 3, generator=gen, dtype=torch.float64) for c in (0.0, 0.5)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(400):
        loss = 0.0
        for c, eps in target.items():
            use = math.nan if step % 5 == 0 else c  # condition dropout 0.2
            out = model(one, 0.3, score=True, condition=use).eps[mov]
            loss = loss + ((out - (eps if use == c else 0.5 * (target[0.0] + target[0.5]))) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = {c: float(((model(one, 0.3, score=True, condition=c).eps[mov] - e) ** 2).mean())
               for c, e in target.items()}
        swapped = float(((model(one, 0.3, score=True, condition=0.5).eps[mov] - target[0.0]) ** 2).mean())
    spread = float(((target[0.0] - target[0.5]) ** 2).mean())
    assert max(err.values()) < 0.05 * spread < swapped


def test_energy_differences_per_cell_and_composition():
    from surfdiff_core.train.data import Sample, repeat_sample, set_energy_differences

    def sample(energy, composition, n_movable):
        from ase.build import fcc111

        atoms = fcc111("Ag", size=(1, 1, 1 + n_movable), vacuum=5.0)
        mov = np.arange(len(atoms)) >= 1
        return Sample(atoms=atoms, movable=mov, z_box=(0.0, 3.0), energy=energy, forces=np.zeros((len(atoms), 3)),
                      frames=[], doc_id=f"{energy}", composition=composition, group="g")

    samples = [sample(-10.0, "Ag1", 1), sample(-9.0, "Ag1", 1), sample(-8.0, "Ag1", 1),
               sample(-20.0, "Ag3", 3), sample(-18.5, "Ag3", 3)]
    set_energy_differences(samples, ["cellA", "cellA", "cellB", "cellA", "cellA"])
    np.testing.assert_allclose([s.e_diff for s in samples], [0.0, 1.0, 0.0, 0.0, 0.5])
    assert repeat_sample(samples[4], 2).e_diff == pytest.approx(0.5)  # intensive: tiles keep it


@pytest.fixture(scope="module")
def conditioned_study(tmp_path_factory):
    from surfdiff_core.stages import rss, train
    from surfdiff_core.stages.common import open_study_store
    from tests.conftest import TINY_CONFIG

    d = tmp_path_factory.mktemp("cond")
    path = d / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(d / "store")).replace(
        "time_features: 8}", "time_features: 8, energy_features: 8}"))
    cfg = load_config(path)
    store = open_study_store(cfg).connect()
    model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
    yield cfg, store, model
    store.close()


def test_conditioned_study_trains_and_samples_at_a_target_energy(conditioned_study):
    from surfdiff_core.stages import sample
    from surfdiff_core.stages.common import training_system
    from surfdiff_core.train.checkpoint import load_checkpoint
    from surfdiff_core.train.data import DataScope, load_samples

    cfg, store, model = conditioned_study
    loaded = load_checkpoint(model.checkpoint)
    assert loaded.model.spec.energy_features == 8
    scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id, energy_models=("emt",))
    samples, _ = load_samples(store, scope, cfg.train)
    spreads = [s.e_diff for s in samples]
    assert min(spreads) == 0.0 and max(spreads) > 0.0
    # the E_diff scale comes from the training split: between the data's extremes
    assert 0.0 < float(loaded.model.energy_condition.scale) <= max(spreads)

    plain = sample.run(cfg, store, model, run_id="plain", progress=False)
    low = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"energy_target": 0.0, "cfg_scale": 2.0})})
    steered = sample.run(low, store, model, run_id="low", progress=False)
    assert not set(plain.doc_ids) & set(steered.doc_ids)  # the condition is part of the sample's identity
    docs = list(store.find({"doc_id": {"$in": steered.doc_ids}}))
    assert len(docs) == cfg.sample.n and all(d.meta["energy_target"] == 0.0 and d.meta["cfg_scale"] == 2.0
                                              for d in docs)
    assert all(d.meta["energy_target"] is None for d in store.find({"doc_id": {"$in": plain.doc_ids}}))


def test_energy_target_needs_a_conditioned_model(tmp_path):
    from tests.conftest import TINY_CONFIG

    path = tmp_path / "bad.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "s")).replace("relax_steps: 5", "relax_steps: 5\n"
                                                                             "  energy_target: 0.0"))
    with pytest.raises(ConfigError, match="energy_target needs an energy-conditioned model"):
        load_config(path)


def test_unconditioned_model_ids_ignore_the_conditioning_settings(tmp_path):
    from surfdiff_core.config import ModelConfig, TrainConfig
    from surfdiff_core.train.data import DataScope
    from surfdiff_core.train.trainer import model_id_for

    scope = DataScope(study="s", system_id="sys", energy_models=("emt",))
    ids = {(f, p): model_id_for(ModelConfig(energy_features=f), TrainConfig(condition_dropout=p), "fp", scope)
           for f in (0, 8) for p in (0.1, 0.3)}
    assert ids[(0, 0.1)] == ids[(0, 0.3)]  # dropout means nothing without conditioning
    assert len({ids[(0, 0.1)], ids[(8, 0.1)], ids[(8, 0.3)]}) == 3


def test_checkpoints_from_before_energy_conditioning_still_fine_tune(tmp_path):
    from surfdiff_core.errors import SurfdiffError
    from surfdiff_core.train.checkpoint import warm_start

    plain = ModelSpec(**{**SPEC.to_dict(), "energy_features": 0})
    old = SurfaceModel(plain)
    spec = plain.to_dict()
    del spec["energy_features"]  # as written by earlier versions
    path = tmp_path / "old.pt"
    torch.save({"spec": spec, "state_dict": old.state_dict()}, path)
    new = SurfaceModel(plain)
    warm_start(new, path, torch.device("cpu"))
    for a, b in zip(new.score_head.parameters(), old.score_head.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(SurfdiffError, match="another architecture"):
        warm_start(SurfaceModel(SPEC), path, torch.device("cpu"))  # conditioned: a different score head
