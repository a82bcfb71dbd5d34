"""Random structure search (RSS): the diffusion model's training data.

Each structure: random placement of the overlayer in the confinement box at element-pair minimum distances
(PBC in-plane), then a local relaxation with the chosen oracle, bottom substrate layers fixed. Atoms that
leave the box during relaxation are *flagged* (`in_box=False`) and the document is kept but excluded from
training sets, so the box stays an honest description of the data.

Seeded per structure (SeedSequence of the run seed and the structure index), so a rerun with the same seed
reproduces every structure; document ids are deterministic, so finished structures are skipped on resume and
failed ones are retried up to rss.max_attempts times (see surfdiff_core.retry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from surfdiff_core.config import SurfdiffConfig, with_overrides
from surfdiff_core.errors import ConfigError, SurfdiffError
from surfdiff_core.executors import local_processes
from surfdiff_core.progress import progress_bar
from surfdiff_core.remote import run_on
from surfdiff_core.retry import PriorFailure, attempt_meta, claimed_work, plan_work
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import atoms_to_structure_dict
from surfdiff_core.system import SurfaceSystem
from surfdiff_core.system_build import resolve_lattice, systems_for


@dataclass(frozen=True)
class RSSTask:
    index: int
    composition: str
    seed: int
    doc_id: str


@dataclass
class RSSReport:
    planned: int = 0
    skipped: int = 0  # already in the store (resume), failures that used up their attempts included
    retried: int = 0  # stored failures tried again in this run
    given_up: int = 0  # stored failures not retried: rss.max_attempts reached
    done: int = 0
    failed: int = 0
    out_of_box: int = 0
    wall_time: float = 0.0
    best: dict[str, float] = field(default_factory=dict)
    doc_ids: list[str] = field(default_factory=list)  # every planned structure, finished now or before
    lost: dict[str, str] = field(default_factory=dict)  # doc_id -> why its worker/job died (not stored)
    by_others: int = 0  # planned here, but computed by another process sharing the store (claims)

    @property
    def per_minute(self) -> float:
        return 60.0 * self.done / self.wall_time if self.wall_time > 0 else 0.0


def plan_tasks(cfg: SurfdiffConfig, systems: dict[str, SurfaceSystem], n: int, seed: int) -> list[RSSTask]:
    """n structures spread round-robin over the compositions; ids fixed by (study, system, oracle, config, seed,
    i), so two studies in one store never share or skip each other's structures."""
    comps = list(systems)
    config_hash = cfg.section_hash("substrate", "confinement", "oracle")
    tasks = []
    for i in range(n):
        comp = comps[i % len(comps)]
        sub_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        doc_id = make_doc_id(
            "rss", cfg.name, systems[comp].system_id, comp, config_hash, cfg.rss.min_distance_scale, cfg.rss.fmax,
            cfg.rss.steps, seed, i,
        )
        tasks.append(RSSTask(index=i, composition=comp, seed=sub_seed, doc_id=doc_id))
    return tasks


# ---- worker side (the processes themselves: surfdiff_core.executors.local_processes) -----------------------
_WORKER: dict[str, Any] = {}


def worker_calculator(oracle: str, settings: dict):
    """One calculator per worker process and energy model (loading CHGNet once, not per structure)."""
    from surfdiff_core.config import energy_model_key
    from surfdiff_core.oracles import get_calculator

    key = energy_model_key(oracle, settings)
    if _WORKER.get("calc_key") != key:
        _WORKER["calc"], _WORKER["calc_key"] = get_calculator(oracle, **settings), key
    return _WORKER["calc"]


def relax_task(
    system: SurfaceSystem, task: RSSTask, cfg: SurfdiffConfig, *, run_id: str | None, calculator=None,
    prior: PriorFailure | None = None,
) -> StructureDoc:
    """Place and relax one structure; returns its document (an error is recorded, never raised). `prior`: the
    stored failures of this structure, when this is a retry (counted in meta.attempts, kept in meta.errors)."""
    from surfdiff_core.relax.ase_relax import relax_atoms
    from surfdiff_core.relax.records import Relaxed, error_text, relaxation_record

    calc = calculator if calculator is not None else worker_calculator(cfg.oracle.name, cfg.oracle.settings)
    rng = np.random.default_rng(task.seed)
    initial = system.random_structure(rng)
    base = dict(
        doc_id=task.doc_id, source="rss", study=cfg.name, energy_model=cfg.oracle.energy_model,
        composition=system.composition, system_id=system.system_id,
        element=system.element, facet=system.facet, cell=system.cell, n_substrate=system.n_substrate,
        movable=system.movable.tolist(), fixed=system.fixed_indices.tolist(), z_box=list(system.z_box),
        oracle=cfg.oracle.name, oracle_settings=cfg.oracle.settings,
        initial_structure=atoms_to_structure_dict(initial), run_id=run_id, seed=task.seed,
        config_hash=cfg.section_hash("substrate", "confinement", "oracle"),
        meta={"rss_index": task.index, "optimizer": cfg.rss.optimizer},
    )
    base["formula"] = initial.get_chemical_formula()
    try:
        outcome: Relaxed | str = Relaxed.from_ase(relax_atoms(
            initial, calc, fmax=cfg.rss.fmax, steps=cfg.rss.steps, optimizer=cfg.rss.optimizer,
            trajectory_every=cfg.rss.trajectory_every, fixed=system.fixed_indices.tolist(),
        ))
    except Exception as exc:  # noqa: BLE001 - one bad structure must not stop the search
        outcome = error_text(exc)
    base["meta"].update(attempt_meta(prior, outcome if isinstance(outcome, str) else None))
    # the random placement is this structure's start, kept whether or not its relaxation finished
    return relaxation_record(outcome, base["initial_structure"], box=(system.n_substrate, system.z_box), **base)


def relax_remote(system: SurfaceSystem, task: RSSTask, cfg: SurfdiffConfig, run_id: str | None,
                 prior: PriorFailure | None = None) -> dict:
    """What an executor runs (a worker process, a Slurm job): one structure, its document as plain JSON."""
    with threadpool_limits(1, user_api="blas"):
        return relax_task(system, task, cfg, run_id=run_id, prior=prior).model_dump(mode="json")


# ---- driver -----------------------------------------------------------------------------------------------
def run_rss(
    cfg: SurfdiffConfig,
    store: ResultsStore,
    *,
    n: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
    run_id: str | None = None,
    progress: bool = True,
    on_doc: Callable[[StructureDoc], None] | None = None,
    executor: Executor | None = None,
) -> RSSReport:
    """Run (or resume) the RSS of `cfg.rss` into `store`. Documents are written as each structure finishes.

    `executor` (any concurrent.futures.Executor, e.g. the Slurm one of deploy/) runs the relaxations
    elsewhere; by default they run here, in `workers` local processes."""
    # Every number through the config model: one line naming the option, before anything runs.
    rcfg = with_overrides(cfg.rss, {"n": n, "seed": seed, "workers": workers})
    n, seed, workers = rcfg.n, rcfg.seed, rcfg.workers
    from surfdiff_core.oracles import get_oracle_spec

    if not get_oracle_spec(cfg.oracle.name).in_process:  # VASP: a job per structure on HPC, never here
        raise ConfigError(f"RSS with oracle {cfg.oracle.name!r} runs through the HPC route (flows/relax); choose "
                          f"a local oracle")
    from surfdiff_core.oracles import get_calculator

    lattice = resolve_lattice(cfg)
    systems = systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, lattice)
    if n == 0:  # nothing asked: the store is not opened, let alone created
        return RSSReport()
    tasks = plan_tasks(cfg, systems, n, seed)
    report = RSSReport(planned=len(tasks), doc_ids=[t.doc_id for t in tasks])
    store.connect()
    work = plan_work(store, (t.doc_id for t in tasks), cfg.rss.max_attempts)
    todo = [t for t in tasks if t.doc_id not in work.finished]
    report.skipped = len(tasks) - len(todo)
    report.retried, report.given_up = len(work.retry), len(work.given_up)
    start = time.perf_counter()
    bar = progress_bar(total=len(todo), desc="RSS", unit="struct", disable=not progress, dynamic_ncols=True)

    def record(doc: StructureDoc) -> None:
        store.put(doc)
        if doc.error:
            report.failed += 1
        else:
            report.done += 1
            report.out_of_box += int(not doc.in_box)
            if doc.energy is not None and doc.in_box:
                best = report.best.get(doc.composition)
                report.best[doc.composition] = doc.energy if best is None else min(best, doc.energy)
        if on_doc:
            on_doc(doc)
        bar.set_postfix(failed=report.failed, out_of_box=report.out_of_box, refresh=False)  # shown by update
        bar.update(1)

    def lost(doc_id: str, why: str) -> None:
        report.failed += 1
        report.lost[doc_id] = why
        bar.update(1)

    # Claimed one by one as a worker frees up, so that processes sharing the store split the work.
    queue = claimed_work(store, [t.doc_id for t in todo], work, cfg.rss.max_attempts,
                         on_elsewhere=lambda _: bar.update(1))
    tasks_by_id = {t.doc_id: t for t in todo}

    def job(doc_id: str) -> tuple[Callable[..., dict], tuple]:
        t = tasks_by_id[doc_id]
        return relax_remote, (systems[t.composition], t, cfg, run_id, work.retry.get(doc_id))

    def finished(doc_id: str, data: dict) -> None:
        record(StructureDoc.model_validate(data))

    try:
        with queue:
            if executor is not None:  # Slurm: every job submitted at once, as before
                run_on(executor, queue, len(todo), job, finished, lost)
            elif workers == 1 or len(todo) <= 1:
                calc = get_calculator(cfg.oracle.name, **cfg.oracle.settings) if todo else None
                with threadpool_limits(1, user_api="blas"):
                    while (doc_id := queue.next()) is not None:
                        t = tasks_by_id[doc_id]
                        record(relax_task(systems[t.composition], t, cfg, run_id=run_id, calculator=calc,
                                          prior=work.retry.get(t.doc_id)))
                        queue.done(doc_id)
            else:  # interrupted (Ctrl-C, SIGTERM), the pool stops at once: a rerun redoes the running ones
                with local_processes(workers) as pool:
                    run_on(pool, queue, workers, job, finished, lost)
    finally:
        report.by_others = queue.elsewhere
        bar.close()
        report.wall_time = time.perf_counter() - start
    computed = len(todo) - report.by_others
    if computed and len(report.lost) == computed:
        first = next(iter(report.lost.values()))
        raise SurfdiffError(f"every RSS relaxation was lost ({computed}); the first: {first}")
    return report


