"""The evaluation's oracle work on an executor (#29): both arms' relaxations as one job per structure give the same
documents and numbers as here; a lost job is reported by its id, not stored, and a rerun redoes only it."""

from __future__ import annotations

import multiprocessing as mp
import operator
import shutil
from concurrent.futures import Executor, Future, ProcessPoolExecutor

import pytest

from surfdiff_core.stages import evaluate
from surfdiff_core.stages.common import open_study_store
from tests.conftest import TINY_CONFIG, train_and_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A tiny study trained and sampled once; each test evaluates in its own copy of the store."""
    root = tmp_path_factory.mktemp("ev-exec")
    cfg, samples = train_and_sample(root, TINY_CONFIG, "ev.yaml")
    return cfg, root / "store", samples


def copy_study(sampled, dest):
    cfg, store_dir, samples = sampled
    shutil.copytree(store_dir, dest)
    return cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(dest)})}), samples


def processes() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))  # as local_processes: a fresh interpreter


class FailingFor(Executor):
    """Runs jobs on `inner`, except the job of `doc_id`, which raises in the worker (a job that died there)."""

    def __init__(self, inner: Executor, doc_id: str) -> None:
        self.inner, self.doc_id = inner, doc_id

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self.doc_id in args:
            return self.inner.submit(operator.truediv, 1, 0)
        return self.inner.submit(fn, *args, **kwargs)


class NoJobs(Executor):
    def submit(self, fn, /, *args, **kwargs) -> Future:
        raise AssertionError("a rerun submitted a job although everything is stored")


def numbers(result) -> list[tuple]:
    return [(t.relaxed_ids, t.rss_ids, t.rss_lost_ids, t.generative_energies, t.rss_energies, t.speedup, t.cost,
             t.steps_generative, t.steps_rss, t.lost) for t in result.targets]


def test_evaluation_on_an_executor_equals_the_local_one(sampled, tmp_path):
    here_cfg, samples = copy_study(sampled, tmp_path / "here")
    there_cfg, _ = copy_study(sampled, tmp_path / "there")
    with open_study_store(here_cfg) as store:
        here = evaluate.run(here_cfg, store, samples, progress=False)
    with processes() as pool, open_study_store(there_cfg) as store:
        there = evaluate.run(there_cfg, store, samples, progress=False, executor=pool)
        n = store.count({})
        (t,) = there.targets
        assert t.relaxed_ids and t.rss_ids and not t.lost
        assert {d.source for d in store.find({"doc_id": {"$in": t.relaxed_ids}})} == {"relaxed"}
    assert numbers(there) == numbers(here)
    assert there.all_in == here.all_in and there.rows() == here.rows()
    with open_study_store(there_cfg) as store:  # a rerun on the executor relaxes nothing again
        again = evaluate.run(there_cfg, store, samples, progress=False, executor=NoJobs())
        assert store.count({}) == n and numbers(again) == numbers(here)


def test_a_lost_job_is_reported_and_redone_by_a_rerun(sampled, tmp_path):
    cfg, samples = copy_study(sampled, tmp_path / "store")
    with open_study_store(cfg) as store:
        full = evaluate.run(cfg, store, samples, progress=False)  # the ids the evaluation relaxes
    cfg, samples = copy_study(sampled, tmp_path / "again")
    (target,) = full.targets
    victim = target.relaxed_ids[0]
    with processes() as pool, open_study_store(cfg) as store:
        broken = evaluate.run(cfg, store, samples, progress=False, executor=FailingFor(pool, victim))
        (t,) = broken.targets
        assert list(t.lost) == [victim] and "ZeroDivisionError" in t.lost[victim]
        assert store.count({"doc_id": victim}) == 0  # never stored, not even as a failure
        assert t.relaxed_ids == [i for i in target.relaxed_ids if i != victim]
        assert store.count({"doc_id": {"$in": t.relaxed_ids}}) == len(t.relaxed_ids)
        assert any("lost on the executor" in w for w in broken.warnings())
        fixed = evaluate.run(cfg, store, samples, progress=False, executor=pool)
        assert numbers(fixed) == numbers(full)
        assert store.count({"doc_id": victim}) == 1
        assert store.count({"doc_id": {"$in": [*target.relaxed_ids, *target.rss_ids]}}) == len(
            {*target.relaxed_ids, *target.rss_ids})
