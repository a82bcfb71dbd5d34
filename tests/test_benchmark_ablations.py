"""benchmarks/discovery/ablations.py: guided against unguided unrelaxed samples and quality against diffusion
steps, moved out of the evaluation stage, still computed on a tiny EMT study and repeating nothing on a rerun."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from surfdiff_core.config import SampleTarget, load_config
from surfdiff_core.stages import rss, sample, train
from surfdiff_core.stages.common import open_study_store
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "discovery"


def _ablations():
    spec = importlib.util.spec_from_file_location("bench_ablations", BENCH / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablations_compute_through_the_benchmark(tmp_path):
    ablations = _ablations()
    path = tmp_path / "ab.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        samples = sample.run(cfg, store, model, progress=False)
        first = samples.targets[0]
        target = SampleTarget(cell=first.cell, composition=first.composition)
        out = ablations.run(cfg, store, model, target, guidance_n=2, steps=[8, 4])
        assert set(out["guidance"]) >= {"guided", "unguided"}
        assert sorted(out["steps_quality"]["before"]) == [4, 8] and sorted(out["steps_quality"]["after"]) == [4, 8]
        n = store.count({})
        again = ablations.run(cfg, store, model, target, guidance_n=2, steps=[8, 4])
        # they sample afresh but deterministically: the same documents and numbers again
        assert store.count({}) == n and again == out
        lines = ablations.report_lines([{"seed": 1, "window": "D", **out}], tmp_path, tmp_path / "figures")
        assert any("guidance lowers it by" in line for line in lines)
        assert (tmp_path / "figures" / "steps-s1.png").stat().st_size > 5_000
        assert ablations.run(cfg, store, model, target, guidance_n=0, steps=[]) == {}
