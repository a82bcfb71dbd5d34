"""The evaluation takes the relax stage's relaxations where they are its own (same oracle, fmax, steps and
optimiser): those candidates are not relaxed again, and every number is the one a fresh evaluation gives."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from maggma.stores import MemoryStore

from surfdiff_core.config import SampleTarget, load_config
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages import evaluate, relax
from surfdiff_core.stages.common import open_study_store
from surfdiff_core.stages.evaluate_report import EvaluationResult, TargetEvaluation
from tests.conftest import TINY_CONFIG, train_and_sample

pytestmark = pytest.mark.slow

# the relax stage as RSS relaxes (rss: fmax 0.2, steps 40, BFGS), the two best candidates of the target
CONFIG = (TINY_CONFIG.replace("relax: {method: emt, top_k: 1, steps: 30, fmax: 0.2}",
                              "relax: {method: emt, top_k: 2, steps: 40, fmax: 0.2}")
          .replace("evaluate: {budget: 2, rss_budget: 3}", "evaluate: {budget: 3, rss_budget: 3}")
          .replace("  n: 4\n", "  n: 6\n"))
NUMBERS = ("generative_energies", "rss_energies", "speedup", "cost", "steps_generative", "steps_rss",
           "mlff_rank_correlation", "generative_lost", "one_target_all_in")


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A trained and sampled tiny study: (its folder, the sample result). Each test copies the store."""
    root = tmp_path_factory.mktemp("sampled")
    return root, train_and_sample(root, CONFIG)[1]


def study_copy(sampled, into):
    """The sampled study's config over a copy of its store at `into` (an identical, separate store)."""
    root, _ = sampled
    shutil.copytree(root / "store", into / "store")
    path = into / "study.yaml"
    path.write_text(CONFIG.replace("STORE", str(into / "store")))
    return load_config(path)


def evaluation_docs(store) -> int:
    return store.count({"source": "relaxed", "meta.purpose": "evaluate"})


def test_matching_relaxations_are_reused_and_change_no_number(sampled, tmp_path):
    _, samples = sampled
    reusing, plain = study_copy(sampled, tmp_path / "a"), study_copy(sampled, tmp_path / "b")
    with open_study_store(reusing) as store:
        relaxed = relax.run(reusing, store, samples, jobs_store=MemoryStore("jobs"))
        assert (relaxed.fmax, relaxed.steps, relaxed.optimizer) == (0.2, 40, "BFGS") and relaxed.relaxed >= 1
        before = evaluation_docs(store)
        with_reuse = evaluate.run(reusing, store, samples, relaxed=relaxed, progress=False)
        made_reusing = evaluation_docs(store) - before
    with open_study_store(plain) as store:
        before = evaluation_docs(store)
        alone = evaluate.run(plain, store, samples, progress=False)
        made_alone = evaluation_docs(store) - before

    (t,), (ref,) = with_reuse.targets, alone.targets
    # every candidate the relax stage relaxed is among the evaluation's (budget 3 >= top_k 2, the same ranking)
    assert t.relax_reused == with_reuse.relax_reused == relaxed.relaxed
    assert with_reuse.relax_reuse_refused is None and alone.relax_reused == 0
    assert made_alone - made_reusing == t.relax_reused
    assert len(set(t.relaxed_ids) & set(relaxed.doc_ids)) == t.relax_reused
    assert len(t.relaxed_ids) == len(ref.relaxed_ids) == made_alone
    for name in NUMBERS:
        assert json.dumps(getattr(t, name)) == json.dumps(getattr(ref, name)), name
    assert with_reuse.training_cost == alone.training_cost and with_reuse.all_in == alone.all_in
    assert with_reuse.phase_diagram == alone.phase_diagram
    # the new fields travel with the result's plain form
    data = json.loads(json.dumps(with_reuse.as_dict()))
    back = EvaluationResult(**{**data, "targets": [TargetEvaluation(**x) for x in data["targets"]]})
    assert json.dumps(back.as_dict()) == json.dumps(with_reuse.as_dict())
    assert back.targets[0].relax_reused == t.relax_reused


def test_other_relaxer_settings_reuse_nothing_and_say_why(sampled, tmp_path):
    _, samples = sampled
    cfg = study_copy(sampled, tmp_path / "c")
    with open_study_store(cfg) as store:
        relaxed = relax.run(cfg, store, samples, rcfg=cfg.relax.model_copy(update={"fmax": 0.1}),
                            jobs_store=MemoryStore("jobs"))
        assert relaxed.relaxed >= 1
        before = evaluation_docs(store)
        result = evaluate.run(cfg, store, samples, relaxed=relaxed, progress=False)
        (t,) = result.targets
        assert result.relax_reused == t.relax_reused == 0
        assert "relax fmax 0.1 vs rss.fmax 0.2" in result.relax_reuse_refused
        assert evaluation_docs(store) - before == len(t.relaxed_ids) >= 1
        assert not set(t.relaxed_ids) & set(relaxed.doc_ids)


def test_a_relax_result_of_another_study_or_targets_is_refused(sampled, tmp_path):
    _, samples = sampled
    cfg = study_copy(sampled, tmp_path / "d")
    with open_study_store(cfg) as store:
        relaxed = relax.run(cfg, store, samples, jobs_store=MemoryStore("jobs"))
        n = store.count({})
        with pytest.raises(SurfdiffError, match="relax result is of study 'other', not 'tiny'"):
            evaluate.run(cfg, store, samples, relaxed=dataclasses.replace(relaxed, study="other"), progress=False)
        other_target = [SampleTarget(cell="p(2x2)", composition="Ag1O1")]
        with pytest.raises(SurfdiffError, match=r"has no candidates of Ag1O1 in p\(2x2\)"):
            evaluate.run(cfg, store, samples, relaxed=relaxed, targets=other_target, progress=False)
        assert store.count({}) == n  # refused before any work
