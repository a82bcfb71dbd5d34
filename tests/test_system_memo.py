"""Each target's SurfaceSystem is built once per process (lattice resolution and slab construction), keyed by what
fixes it, and every caller gets its own copy: the same systems as built directly, which no caller can change for
another."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from surfdiff_core import system_build
from surfdiff_core.config import SampleTarget, SurfdiffConfig, load_config
from surfdiff_core.stages.common import sample_targets, target_system, training_system
from surfdiff_core.system import SurfaceSystem, build_system

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep_cfg(lattice_cache, tmp_path) -> SurfdiffConfig:
    """configs/sweep-ag111-o.yaml (12 targets, lattice_constant auto) with its store in tmp_path."""
    cfg = load_config(ROOT / "configs" / "sweep-ag111-o.yaml")
    return cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(tmp_path / "store")})})


@pytest.fixture
def builds(monkeypatch) -> Counter:
    """Every system construction, by (cell, composition)."""
    seen: Counter = Counter()
    real = system_build.build_system

    def counting(substrate, confinement, cell, composition, **kw):
        system = real(substrate, confinement, cell, composition, **kw)
        seen[(system.cell, system.composition)] += 1
        return system

    monkeypatch.setattr(system_build, "build_system", counting)
    return seen


def same(a: SurfaceSystem, b: SurfaceSystem) -> None:
    assert a.system_id == b.system_id and a.composition == b.composition and a.cell == b.cell
    assert np.array_equal(a.template.numbers, b.template.numbers)
    np.testing.assert_allclose(a.template.positions, b.template.positions, atol=0)
    np.testing.assert_allclose(np.asarray(a.template.cell), np.asarray(b.template.cell), atol=0)
    assert a.z_box == b.z_box and a.overlayer == b.overlayer and a.matrix == b.matrix
    assert a.min_distance_scale == b.min_distance_scale and a.meta == b.meta
    assert np.array_equal(a.fixed_indices, b.fixed_indices) and np.array_equal(a.movable, b.movable)
    assert a == b


def test_sweep_systems_equal_the_direct_builds(sweep_cfg, builds):
    cfg = sweep_cfg
    targets = sample_targets(cfg)
    assert len(targets) == 12
    lattice = system_build.resolve_lattice(cfg)
    for t in [*targets, SampleTarget(cell=cfg.rss.cell, composition=cfg.rss.compositions[0])]:
        direct = build_system(cfg.substrate, cfg.confinement, t.cell, t.composition, lattice=lattice,
                              min_distance_scale=cfg.rss.min_distance_scale)
        for _ in range(3):
            same(target_system(cfg, t), direct)
    same(training_system(cfg), target_system(cfg, SampleTarget(cell=cfg.rss.cell,
                                                                composition=cfg.rss.compositions[0])))
    assert set(builds.values()) == {1} and len(builds) == 13


def test_callers_get_copies_they_cannot_change_for_each_other(sweep_cfg, builds):
    t = sample_targets(sweep_cfg)[0]
    a = target_system(sweep_cfg, t)
    original = a.template.positions.copy()
    a.template.positions[0] += 1.0
    a.template.set_tags(np.zeros(len(a.template), int))
    a.meta["touched"] = True
    b = target_system(sweep_cfg, t)
    assert b is not a and b.template is not a.template
    np.testing.assert_array_equal(b.template.positions, original)
    assert b.n_layers == sweep_cfg.substrate.layers and "touched" not in b.meta
    assert builds[(b.cell, b.composition)] == 1
    # a composition built from a memoised system shares nothing with it either
    c = b.with_composition("Ag1O1")
    c.template.positions[1] += 1.0
    np.testing.assert_array_equal(target_system(sweep_cfg, t).template.positions, original)


def test_the_memo_key_is_what_fixes_a_system(sweep_cfg, builds):
    cfg = sweep_cfg
    t = sample_targets(cfg)[0]
    target_system(cfg, t)
    # another study name, RSS size or seed (the baseline arm's config): the same system
    arm = cfg.model_copy(update={"name": "arm", "rss": cfg.rss.model_copy(update={"n": 3, "seed": 9,
                                                                                   "cell": t.cell})})
    target_system(arm, t)
    assert sum(builds.values()) == 1
    # what the system depends on: built anew
    for update in ({"substrate": cfg.substrate.model_copy(update={"vacuum": 12.0})},
                   {"confinement": cfg.confinement.model_copy(update={"z_max": 5.0})},
                   {"rss": cfg.rss.model_copy(update={"min_distance_scale": 0.7})}):
        target_system(cfg.model_copy(update=update), t)
    assert sum(builds.values()) == 4


def test_rss_planning_and_the_sweep_share_the_memo(sweep_cfg, builds):
    """The RSS (and so the baseline arm) builds its systems through the same memo as target_system."""
    cfg = sweep_cfg
    lattice = system_build.resolve_lattice(cfg)
    first = system_build.systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, lattice)
    again = system_build.systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, lattice)
    for comp in cfg.rss.compositions:
        same(first[comp], again[comp])
        same(first[comp], target_system(cfg, SampleTarget(cell=cfg.rss.cell, composition=comp)))
        assert first[comp].template is not again[comp].template
    assert sum(builds.values()) == len(cfg.rss.compositions)


@pytest.mark.slow
def test_each_system_is_built_once_through_sample_and_evaluate(sweep_cfg, builds):
    """The sweep's 12 targets through training, sampling (shared batches) and the evaluation with its baseline
    arm (RSS in every target cell) and phase diagram: each system (and the training cell's) built once."""
    from surfdiff_core.stages import evaluate, rss, sample, train
    from surfdiff_core.stages.common import open_study_store

    cfg = sweep_cfg
    cfg = cfg.model_copy(update={
        "rss": cfg.rss.model_copy(update={"n": 6, "workers": 1, "steps": 20}),
        "model": cfg.model.model_copy(update={"n_features": 8, "n_rbf": 8, "n_interactions": 1, "cutoff": 4.0}),
        "train": cfg.train.model_copy(update={"epochs": 1, "ensemble": 1, "repeat": 1}),
        "sample": cfg.sample.model_copy(update={"n": 2, "steps": 2, "relax_steps": 1, "batch_size": 8}),
        "active_learning": cfg.active_learning.model_copy(update={"rounds": 0}),
        "evaluate": cfg.evaluate.model_copy(update={"budget": 1, "rss_budget": 1}),
    })
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        samples = sample.run(cfg, store, model, progress=False)
        result = evaluate.run(cfg, store, samples, progress=False)
    assert len(result.targets) == 12
    assert builds and max(builds.values()) == 1, builds
    assert {(t.cell, t.composition) for t in result.targets} <= set(builds)
