"""Active learning's oracle labels on an executor (#26): one job per label (relaxations and single points) gives the
same label documents, ids and energies, and the same fine-tuned model as here; a lost job is reported by its id,
not stored, and a rerun redoes only it."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from concurrent.futures import Executor, Future

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.stages import active, rss, train
from surfdiff_core.stages.common import open_study_store
from tests.conftest import TINY_CONFIG
from tests.test_evaluate_executor import FailingFor, NoJobs

pytestmark = pytest.mark.slow

AL = "active_learning: {rounds: 1, relax_per_round: 2, single_points_per_round: 2, epochs: 2}\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny study with its RSS data and first model, once; each test learns in its own copy of the store."""
    root = tmp_path_factory.mktemp("al-exec")
    path = root / "al.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(root / "store")) + AL)
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        first = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
    return cfg, root / "store", first


def copy_study(trained, dest):
    """The store copied to dest/store: checkpoints and figures go to dest (data_root), apart from other copies."""
    cfg, store_dir, first = trained
    shutil.copytree(store_dir, dest / "store")
    return cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(dest / "store")})}), first


def processes():
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))  # as local_processes: a fresh interpreter


class Counting(Executor):
    """Runs every job on `inner`, remembering the ids it was given (the label's doc id is a job argument)."""

    def __init__(self, inner: Executor) -> None:
        self.inner, self.ids = inner, []

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.ids += [a for a in args if isinstance(a, str)]
        return self.inner.submit(fn, *args, **kwargs)


def label_docs(store) -> dict[str, tuple[str, float, int]]:
    return {d.doc_id: (d.source, d.energy, d.steps) for d in store.find({"meta.active_learning": True})}


def test_labels_on_an_executor_equal_the_local_ones(trained, tmp_path):
    here_cfg, first = copy_study(trained, tmp_path / "here")
    there_cfg, _ = copy_study(trained, tmp_path / "there")
    with open_study_store(here_cfg) as store:
        here = active.run(here_cfg, store, first, progress=False)
        here_labels = label_docs(store)
    with processes() as pool, open_study_store(there_cfg) as store:
        counting = Counting(pool)
        there = active.run(there_cfg, store, first, progress=False, executor=counting)
        there_labels = label_docs(store)
        n = store.count({})
    assert (here.relaxations, here.single_points) == (there.relaxations, there.single_points) == (2, 2)
    assert not there.lost and there.rounds[0]["lost"] == {}
    assert sorted(s for s, _, _ in there_labels.values()) == ["relaxed"] * 2 + ["single_point"] * 2
    assert there_labels.keys() == here_labels.keys()
    assert sorted(i for i in counting.ids if i in there_labels) == sorted(there_labels)  # each label was a job
    for doc_id, (source, energy, steps) in here_labels.items():
        assert there_labels[doc_id][0] == source and there_labels[doc_id][2] == steps
        assert there_labels[doc_id][1] == pytest.approx(energy, abs=1e-8)
    # the same labels train the same model
    assert set(there.model.learned_labels) == set(here.model.learned_labels) == set(here_labels)
    assert there.model.model_id == here.model.model_id
    with open_study_store(there_cfg) as store:  # a rerun on the executor labels nothing again
        again = active.run(there_cfg, store, first, progress=False, executor=NoJobs())
        assert store.count({}) == n and again.model.model_id == here.model.model_id


def test_a_lost_label_is_reported_and_redone_by_a_rerun(trained, tmp_path):
    full_cfg, first = copy_study(trained, tmp_path / "full")
    with open_study_store(full_cfg) as store:
        full = active.run(full_cfg, store, first, progress=False)  # the labels a round makes
        full_labels = label_docs(store)
    victim = next(i for i, (source, _, _) in sorted(full_labels.items()) if source == "relaxed")
    cfg, _ = copy_study(trained, tmp_path / "broken")
    with processes() as pool, open_study_store(cfg) as store:
        broken = active.run(cfg, store, first, progress=False, executor=FailingFor(pool, victim))
        assert list(broken.lost) == [victim] and "ZeroDivisionError" in broken.lost[victim]
        assert broken.rounds[0]["lost"] == broken.lost
        assert store.count({"doc_id": victim}) == 0  # never stored, not even as a failure
        assert (broken.relaxations, broken.single_points) == (1, 2)
        assert victim not in broken.model.learned_labels and broken.model.model_id != full.model.model_id
        assert label_docs(store) == {i: v for i, v in full_labels.items() if i != victim}
        fixed = active.run(cfg, store, first, progress=False, executor=pool)
        assert not fixed.lost and (fixed.relaxations, fixed.single_points) == (2, 2)
        assert store.count({"doc_id": victim}) == 1
        assert label_docs(store).keys() == full_labels.keys()
        assert label_docs(store)[victim][1] == pytest.approx(full_labels[victim][1], abs=1e-8)
        assert fixed.model.model_id == full.model.model_id  # the round's model, trained on the full set
