"""A job that dies on an executor (a Slurm job cancelled or out of time, a worker gone) is lost alike in the RSS and
the relax stage: recorded by id with its reason, nothing stored, the others go on, a rerun redoes only it, and an
interrupted run cancels the jobs that have not started."""

from __future__ import annotations

from concurrent.futures import Executor, Future

import pytest

from surfdiff_core.config import config_from_dict
from surfdiff_core.rss import run_rss
from surfdiff_core.stages import relax
from surfdiff_core.store import open_store

WHY = "Slurm job 7 ended CANCELLED by 0: " + "x" * 400


class _Slurmish(Executor):
    """Runs each call here as it is submitted, except the calls numbered in `lose` (0-based), whose jobs die;
    from call `stop_at` on nothing runs, and that call's result is an interrupt (Ctrl-C while waiting)."""

    def __init__(self, lose: set[int] = frozenset(), stop_at: int | None = None) -> None:
        self.lose, self.stop_at = lose, stop_at
        self.futures: list[Future] = []

    def submit(self, fn, *args, **kwargs) -> Future:
        k, fut = len(self.futures), Future()
        self.futures.append(fut)
        if self.stop_at is not None and k >= self.stop_at:
            if k == self.stop_at:
                fut.set_exception(KeyboardInterrupt())
            return fut
        if k in self.lose:
            fut.set_exception(RuntimeError(WHY))
        else:
            fut.set_result(fn(*args, **kwargs))
        return fut


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({
        "name": "lost", "substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1, "vacuum": 7},
        "confinement": {"z_min": 0.5, "z_max": 4.0},
        "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"], "n": 3, "fmax": 0.3, "steps": 15},
        "relax": {"method": "emt", "steps": 10, "fmax": 0.3},
        "store": {"backend": "sqlite", "path": str(tmp_path / "store")},
    })


def test_a_lost_rss_job_is_recorded_and_redone_alone(cfg):
    with open_store(cfg.store) as store:
        first = run_rss(cfg, store, progress=False, executor=_Slurmish(lose={1}))
        assert (first.done, first.failed, len(first.lost)) == (2, 1, 1)
        (lost_id, why), = first.lost.items()
        assert why == f"RuntimeError: {WHY}"[:300]
        assert store.count({}) == 2 and store.get(lost_id) is None
        again = run_rss(cfg, store, progress=False, executor=_Slurmish())
        assert (again.done, again.skipped, again.failed, again.lost) == (1, 2, 0, {})
        assert store.get(lost_id) is not None


def test_an_interrupted_rss_cancels_the_jobs_not_started(cfg):
    ex = _Slurmish(stop_at=1)
    with open_store(cfg.store) as store, pytest.raises(KeyboardInterrupt):
        run_rss(cfg, store, progress=False, executor=ex)
    assert len(ex.futures) == 3 and all(f.cancelled() for f in ex.futures[2:])


def _candidates(cfg, store) -> list:
    run_rss(cfg, store, progress=False)
    return sorted(store.find({"source": "rss"}), key=lambda d: d.doc_id)


def test_a_lost_relaxation_job_is_recorded_and_redone_alone(cfg):
    with open_store(cfg.store) as store:
        candidates = _candidates(cfg, store)
        first = relax.run(cfg, store, candidates=candidates, run_id="r1", executor=_Slurmish(lose={1}))
        assert (first.relaxed, first.failed, len(first.lost)) == (2, 1, 1)
        (lost_id, why), = first.lost.items()
        assert why == f"RuntimeError: {WHY}"[:300]
        assert store.get(lost_id) is None and lost_id in first.doc_ids
        again = relax.run(cfg, store, candidates=candidates, run_id="r2", executor=_Slurmish())
        assert (again.relaxed, again.skipped, again.failed, again.lost) == (1, 2, 0, {})
        assert store.get(lost_id).parent_id in {c.doc_id for c in candidates}


def test_an_interrupted_relaxation_cancels_the_jobs_not_started(cfg):
    with open_store(cfg.store) as store:
        candidates = _candidates(cfg, store)
        ex = _Slurmish(stop_at=1)
        with pytest.raises(KeyboardInterrupt):
            relax.run(cfg, store, candidates=candidates, run_id="r1", executor=ex)
    assert len(ex.futures) == 3 and all(f.cancelled() for f in ex.futures[2:])
