"""The RSS baseline arm as its own stage: the evaluation reads the arm by the ids its result carries, with the
same documents (ids fixed by study, system, settings and seed) and the same numbers as when it runs it itself."""

from __future__ import annotations

import pytest

from surfdiff_core.config import SampleTarget, SurfdiffConfig, load_config
from surfdiff_core.stages import evaluate, rss, sample, train
from surfdiff_core.stages.common import open_study_store
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def planned_arm_ids(cfg: SurfdiffConfig, target: SampleTarget) -> list[str]:
    """The arm's ids as the RSS plans them: the study's RSS settings moved into the target cell, the baseline
    study's name (evaluate.rss_study) or the study's own, evaluate.rss_budget structures of evaluate.seed."""
    from surfdiff_core.rss import plan_tasks
    from surfdiff_core.system_build import systems_for

    arm = cfg.model_copy(update={"name": cfg.evaluate.rss_study or cfg.name, "rss": cfg.rss.model_copy(
        update={"cell": target.cell, "compositions": [target.composition]})})
    systems = systems_for(arm, target.cell, [target.composition], None)
    return [t.doc_id for t in plan_tasks(arm, systems, cfg.evaluate.rss_budget, cfg.evaluate.seed)]


@pytest.fixture
def tiny_study(tmp_path):
    path = tmp_path / "bl.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        yield cfg, store, sample.run(cfg, store, model, progress=False)


def test_evaluation_runs_the_arm_with_its_planned_ids(tiny_study):
    cfg, store, samples = tiny_study
    (t,) = evaluate.run(cfg, store, samples, progress=False).targets
    assert sorted([*t.rss_ids, *t.rss_lost_ids]) == sorted(planned_arm_ids(cfg, cfg.sample.targets[0]))


def test_evaluation_reads_a_passed_baseline_by_its_ids(tiny_study, monkeypatch):
    from surfdiff_core import rss as rss_module
    from surfdiff_core.stages import baseline

    cfg, store, samples = tiny_study
    arm = baseline.run(cfg, store, progress=False)
    (bt,) = arm.targets
    target = cfg.sample.targets[0]
    assert (bt.composition, bt.cell) == (target.composition, target.cell)
    assert bt.doc_ids == planned_arm_ids(cfg, target) and arm.config_hash == baseline.arm_hash(cfg)
    n_rss = store.count({"source": "rss"})

    def no_relaxation(*args, **kwargs):
        raise AssertionError("the evaluation relaxed the RSS arm although the baseline was passed")

    with monkeypatch.context() as m:
        m.setattr(rss_module, "run_rss", no_relaxation)
        passed = evaluate.run(cfg, store, samples, baseline=arm, progress=False)
    assert store.count({"source": "rss"}) == n_rss
    alone = evaluate.run(cfg, store, samples, progress=False)  # runs the stage itself: finds the same documents
    assert store.count({"source": "rss"}) == n_rss
    (p,), (a,) = passed.targets, alone.targets
    assert p.rss_energies == a.rss_energies and len(p.rss_energies) + len(p.rss_lost_ids) == 3
    assert (p.rss_ids, p.rss_lost_ids, p.speedup, p.cost) == (a.rss_ids, a.rss_lost_ids, a.speedup, a.cost)
    assert passed.all_in == alone.all_in
    # a baseline of other arm settings is refused, not silently compared against
    other = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"seed": 7})})
    with pytest.raises(Exception, match="baseline"):
        evaluate.run(other, store, samples, baseline=arm, progress=False)


def test_rss_study_shares_one_baseline_arm(tmp_path):
    from surfdiff_core.stages import baseline

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store")))
    cfg = load_config(path)

    def study(name: str, rss_study: str | None) -> SurfdiffConfig:
        return cfg.model_copy(update={"name": name,
                                      "evaluate": cfg.evaluate.model_copy(update={"rss_study": rss_study})})

    with open_study_store(cfg) as store:
        a = baseline.run(study("a", "baseline"), store, progress=False)
        n = store.count({})
        b = baseline.run(study("b", "baseline"), store, progress=False)
        assert store.count({}) == n == 3  # the second study computed nothing new
        assert b.doc_ids == a.doc_ids and {d.study for d in store.find({"doc_id": {"$in": b.doc_ids}})} == {"baseline"}
        assert a.rss_study == b.rss_study == "baseline"
        c = baseline.run(study("c", None), store, progress=False)  # without it: the study's own arm
        assert store.count({}) == n + 3 and {d.study for d in store.find({"doc_id": {"$in": c.doc_ids}})} == {"c"}
