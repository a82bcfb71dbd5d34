"""Failed work is retried by later runs, a bounded number of times, and its failures are never forgotten.

A failed relaxation is stored as an error document (so a run can say what failed and why). A later run
redoes it while it has been attempted fewer than `max_attempts` times; the document then written, failed or
not, carries `meta.attempts` (how often this work has been tried) and `meta.errors` (every earlier error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from surfdiff_core.store import ResultsStore
from surfdiff_core.store.claims import WorkQueue, claim_board

_CHUNK = 500


@dataclass(frozen=True)
class PriorFailure:
    attempts: int  # attempts so far, all failed
    errors: tuple[str, ...]  # their messages, oldest first


@dataclass
class WorkPlan:
    finished: set[str] = field(default_factory=set)  # stored and final: succeeded, or failed max_attempts times
    retry: dict[str, PriorFailure] = field(default_factory=dict)  # stored failures to try again
    given_up: set[str] = field(default_factory=set)  # failures that used up their attempts (part of `finished`)


def _prior(doc: dict[str, Any]) -> PriorFailure:
    meta = doc.get("meta") or {}
    errors = [str(e) for e in meta.get("errors") or []]
    if not errors and doc.get("error"):  # a document written before attempts were counted
        errors = [str(doc["error"])]
    attempts = meta.get("attempts")
    return PriorFailure(attempts=int(attempts) if isinstance(attempts, int) else max(len(errors), 1),
                        errors=tuple(errors))


def plan_work(store: ResultsStore, ids: Iterable[str], max_attempts: int) -> WorkPlan:
    """Which of `ids` are finished and which stored failures to retry (attempts < max_attempts)."""
    ids = list(ids)
    plan = WorkPlan(finished=store.existing_ids(ids))
    failed = [i for i in ids if i in plan.finished]
    for k in range(0, len(failed), _CHUNK):
        crit = {"doc_id": {"$in": failed[k : k + _CHUNK]}, "error": {"$ne": None}}
        for doc in store.find_raw(crit, properties=["doc_id", "error", "meta"]):
            if not doc.get("error"):
                continue
            prior = _prior(doc)
            if prior.attempts < max_attempts:
                plan.retry[doc["doc_id"]] = prior
                plan.finished.discard(doc["doc_id"])
            else:
                plan.given_up.add(doc["doc_id"])
    return plan


def still_needed(store: ResultsStore, doc_id: str, planned: WorkPlan, max_attempts: int) -> bool:
    """Whether `doc_id`, planned as `planned` says, is still to compute now that this process holds its claim:
    not stored meanwhile by another process, nor retried by one (its attempts unchanged since planning)."""
    now = plan_work(store, [doc_id], max_attempts)
    before, after = planned.retry.get(doc_id), now.retry.get(doc_id)
    return doc_id not in now.finished and (before.attempts if before else 0) == (after.attempts if after else 0)


def claimed_work(store: ResultsStore, ids: Iterable[str], planned: WorkPlan, max_attempts: int,
                 on_elsewhere: Callable[[str], None] | None = None) -> WorkQueue:
    """The queue that hands out `ids` as this process claims them and each is still needed (still_needed);
    `on_elsewhere` hears of each id another process finished."""
    return WorkQueue(claim_board(store), ids, lambda doc_id: still_needed(store, doc_id, planned, max_attempts),
                     on_elsewhere=on_elsewhere)


def attempt_meta(prior: PriorFailure | None, error: str | None) -> dict[str, Any]:
    """What a new document's `meta` records of its attempts: nothing for work that succeeded at once, else the
    count (this attempt included) and every error so far."""
    if prior is None and error is None:
        return {}
    errors = list(prior.errors if prior else ()) + ([error] if error else [])
    return {"attempts": (prior.attempts if prior else 0) + 1, "errors": errors}
