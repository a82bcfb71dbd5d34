"""Baseline stage: the RSS arm of the evaluation, `evaluate.rss_budget` random structures relaxed directly in each
target cell with the study's oracle and RSS relaxer settings and its own seed (`evaluate.seed`).

It needs no model, so it can run before or beside training (the benchmarks run it ahead in a background
process); the evaluation reads the arm by the ids of its result. Resumable: the ids are fixed by the study, the
system, the RSS settings, the seed and the index, so a rerun relaxes only what is missing. Under
`evaluate.rss_study` the documents belong to that study: studies naming one baseline study share one arm per
target instead of each relaxing its own.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Executor

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages.common import new_run_id, sample_targets, target_system
from surfdiff_core.stages.results import BaselineResult, BaselineTarget
from surfdiff_core.store import ResultsStore, StructureDoc


def arm_study(cfg: SurfdiffConfig) -> str:
    return cfg.evaluate.rss_study or cfg.name


def arm_config(cfg: SurfdiffConfig, target: SampleTarget) -> SurfdiffConfig:
    """The study config the arm of `target` runs as: its RSS section moved into the target cell, with the
    evaluation's budget and seed, under the baseline study's name. (What fixes the documents' ids.)"""
    ev = cfg.evaluate
    rss = cfg.rss.model_copy(update={"cell": target.cell, "compositions": [target.composition],
                                     "n": ev.rss_budget, "seed": ev.seed})
    return cfg.model_copy(update={"rss": rss, **({"name": ev.rss_study} if ev.rss_study else {})})


def arm_hash(cfg: SurfdiffConfig) -> str:
    """What decides the arm's documents (not the targets): two configs of one hash have the same arm in every
    cell. The RSS section's cell, compositions, size and seed are the evaluation's here; workers change nothing."""
    rss = cfg.rss.model_dump(mode="json", exclude={"cell", "compositions", "n", "seed", "workers", "max_attempts"})
    payload = {"study": arm_study(cfg), "rss_budget": cfg.evaluate.rss_budget, "seed": cfg.evaluate.seed, "rss": rss,
               **{s: getattr(cfg, s).model_dump(mode="json") for s in ("substrate", "confinement", "oracle")}}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def run_target(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, progress: bool,
               executor: Executor | None = None) -> BaselineTarget:
    from surfdiff_core.rss import run_rss

    system = target_system(cfg, target)
    out = BaselineTarget(cell=system.cell, composition=system.composition, system_id=system.system_id)
    if cfg.evaluate.rss_budget == 0:
        return out
    # no run id on the documents: a shared arm belongs to no one run of the studies that read it
    report = run_rss(arm_config(cfg, target), store, progress=progress, executor=executor)
    out.doc_ids, out.lost = report.doc_ids, report.lost
    out.done, out.skipped, out.failed = report.done, report.skipped, report.failed
    return out


def run(cfg: SurfdiffConfig, store: ResultsStore, targets: list[SampleTarget] | None = None, *,
        run_id: str | None = None, progress: bool = True, executor: Executor | None = None) -> BaselineResult:
    """The arm of every target (the config's, or `targets`), relaxed or found in the store: on `executor` (a
    concurrent.futures.Executor, e.g. the Slurm one of deploy/) when given, else in rss.workers local processes."""
    result = BaselineResult(study=cfg.name, run_id=run_id or new_run_id(), config_hash=arm_hash(cfg),
                            energy_model=cfg.oracle.energy_model, rss_study=arm_study(cfg),
                            rss_budget=cfg.evaluate.rss_budget, seed=cfg.evaluate.seed)
    for target in targets or sample_targets(cfg):
        result.targets.append(run_target(cfg, store, target, progress, executor))
    return result


def check_baseline(cfg: SurfdiffConfig, baseline: BaselineResult, targets: list[SampleTarget]) -> None:
    """A baseline of other arm settings (study, budget, seed, RSS or oracle settings), or without one of
    `targets`, is refused in one line."""
    if baseline.config_hash != arm_hash(cfg):
        raise SurfdiffError(f"the baseline result (study {baseline.rss_study!r}, {baseline.rss_budget} relaxations, "
                            f"seed {baseline.seed}) is not this config's RSS arm (study {arm_study(cfg)!r}, "
                            f"{cfg.evaluate.rss_budget} relaxations, seed {cfg.evaluate.seed}, or other RSS or "
                            f"oracle settings): run the baseline stage with this config")
    for target in targets:
        system = target_system(cfg, target)
        arm_ids(baseline, system.system_id, system.composition)


def arm_ids(baseline: BaselineResult, system_id: str, composition: str) -> list[str]:
    for t in baseline.targets:
        if (t.system_id, t.composition) == (system_id, composition):
            return t.doc_ids
    raise SurfdiffError(f"the baseline result has no RSS arm of {composition} in {system_id}: run the baseline "
                        f"stage for that target")


def arm_documents(store: ResultsStore, ids: list[str]) -> list[StructureDoc]:
    """The arm's documents in the store's order (the order the evaluation has always read them in); an id
    without a document (a lost job) is not part of the arm."""
    return list(store.find({"doc_id": {"$in": ids}})) if ids else []


def arm_summary(store: ResultsStore, baseline: BaselineResult) -> list[dict]:
    """One row per target for a table or a log: the arm's relaxations in the store, its lost jobs and its best
    energy (over the relaxations that can count as a minimum, as the evaluation reads them)."""
    from surfdiff_core.evaluate.cost import can_hit

    rows = []
    for t in baseline.targets:
        docs = arm_documents(store, t.doc_ids)
        energies = [d.energy for d in docs if can_hit(d)]
        # the RSS counts a lost job as failed too: here the two are apart (a failure is stored, a lost job is not)
        rows.append({"target": t.key, "system_id": t.system_id, "relaxations": len(docs), "done": t.done,
                     "skipped": t.skipped, "failed": t.failed - len(t.lost), "lost": len(t.lost),
                     "best_energy_eV": min(energies) if energies else None})
    return rows
