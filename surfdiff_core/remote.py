"""Oracle work on an executor (any concurrent.futures.Executor: local worker processes, the Slurm one of deploy/),
one loop for RSS, the relax stage and the oracle labels of samples.

A job that dies (a worker killed, a Slurm job cancelled or past its time limit) is *lost*: reported by its id with
the reason, never stored, and the others go on; a rerun redoes only the lost ones, since stored ids are skipped.
Which ids run comes from a WorkQueue (store/claims.py), which also hands back ids whose claim lapsed because the
process that held them died.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any

from surfdiff_core.store.claims import WorkQueue

LOST_CHARS = 300  # a lost job's reason: the telling line, not the whole job log


def lost_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:LOST_CHARS]


def run_on(executor: Executor, queue: WorkQueue, window: int, job: Callable[[str], tuple[Callable[..., Any], tuple]],
           finished: Callable[[str, Any], None], lost: Callable[[str, str], None]) -> None:
    """Keep up to `window` ids of `queue` running on `executor` (`job(id)`: the function and arguments that compute
    it); each result goes to `finished(id, result)` as it comes, each lost job to `lost(id, reason)`. Interrupted
    (Ctrl-C, SIGTERM, an error in `finished`): the jobs not started yet are cancelled."""
    futures: dict[Future, str] = {}
    try:
        while True:
            while len(futures) < window and (doc_id := queue.take()) is not None:
                fn, args = job(doc_id)
                futures[executor.submit(fn, *args)] = doc_id
            if not futures:
                if not queue.waiting():
                    return
                queue.pause()  # the rest is claimed by other processes: wait for it to be stored or to lapse
                continue
            done, _ = wait(futures, timeout=queue.poll_s if queue.waiting() else None, return_when=FIRST_COMPLETED)
            for fut in done:
                doc_id = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - one lost job must not stop the others
                    lost(doc_id, lost_reason(exc))
                else:
                    finished(doc_id, result)
                queue.done(doc_id)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
