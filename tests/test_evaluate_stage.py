"""The evaluation stage on a tiny study: both arms, figures, and a rerun that repeats nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.stages import evaluate, rss, sample, train
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.evaluate_report import markdown_report
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def test_evaluation_compares_both_arms_in_the_target_cell(tmp_path):
    path = tmp_path / "ev.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")).replace(
        "evaluate: {budget: 2, rss_budget: 3}", "evaluate: {budget: 3, rss_budget: 4}"))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        samples = sample.run(cfg, store, model, progress=False)
        result = evaluate.run(cfg, store, samples, progress=False)
        (t,) = result.targets
        assert t.key == "Ag2O1 p(3x3)" and t.validity["total"] == 4
        assert len(t.rss_energies) == 4 and 1 <= len(t.generative_energies) <= 3
        rss_docs = list(store.find({"doc_id": {"$in": t.rss_ids}}))
        assert {d.system_id for d in rss_docs} == {t.system_id} and {d.source for d in rss_docs} == {"rss"}
        relaxed = list(store.find({"doc_id": {"$in": t.relaxed_ids}}))
        assert all(d.parent_id in samples.doc_ids and d.meta["purpose"] == "evaluate" for d in relaxed)
        if t.speedup and t.speedup["generative_relaxations"]:
            assert t.speedup["generative_relaxations"] <= len(t.generative_energies)
        assert result.training_cost["structures"] == 8 and result.training_cost["force_calls"] > 8
        assert result.phase_diagram and result.phase_diagram[0]["dmu_min"] == cfg.evaluate.dmu_range[0]
        for png in result.figures.values():
            assert Path(png).stat().st_size > 5_000
        assert "Evaluation of tiny" in markdown_report(result)
        n = store.count({})
        again = evaluate.run(cfg, store, samples, progress=False)
        assert again.rows()[0]["best_rss_eV"] == result.rows()[0]["best_rss_eV"]
        assert store.count({}) == n
