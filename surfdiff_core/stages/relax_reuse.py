"""The relax stage's relaxations in the evaluation: a candidate the relax stage already relaxed exactly as the
evaluation would (same oracle and settings, same fmax, steps and optimiser) is not relaxed again; its relax-stage
child document stands in for the evaluation's own, ranked and charged like it.

The evaluation relaxes as RSS relaxes (`relax_atoms` with the oracle and rss.fmax, rss.steps, rss.optimizer); the
relax stage relaxes in atomate2's ASE job with relax.method and its settings, relax.fmax and relax.steps (either
may be overridden in relax.settings) and the optimiser of relax.settings (BFGS by default, as RSS). Both run the
same ASE optimiser on the same structure with the bottom layers fixed, so equal settings give the same relaxation
(tests/test_oracle_registry.py, tests/test_evaluate_reuses_relax.py).
"""

from __future__ import annotations

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.stages.common import target_system
from surfdiff_core.stages.results import RelaxResult, relax_target_key
from surfdiff_core.store import ResultsStore, StructureDoc


def check_relax_result(cfg: SurfdiffConfig, store: ResultsStore, relaxed: RelaxResult,
                       targets: list[SampleTarget]) -> None:
    """A relax result of another study, or without one of `targets`, is refused in one line (as check_baseline
    refuses a baseline of other settings)."""
    if relaxed.study != cfg.name:
        raise SurfdiffError(f"the relax result is of study {relaxed.study!r}, not {cfg.name!r}: run the relax stage "
                            f"of this study, or evaluate without it")
    covered = set(relaxed.target_keys) or _candidate_targets(store, relaxed)  # a result that did not record them
    for target in targets:
        system = target_system(cfg, target)
        if relax_target_key(system.system_id, system.composition) not in covered:
            raise SurfdiffError(f"the relax result (run {relaxed.run_id!r}) has no candidates of {system.composition} "
                                f"in {system.cell}: run the relax stage for that target, or evaluate without it")


def relaxer_mismatch(cfg: SurfdiffConfig, relaxed: RelaxResult) -> str | None:
    """Why the relax stage's relaxations are not the evaluation's (one line), or None when they are."""
    rss = cfg.rss
    pairs = [("relax.method", relaxed.method, "oracle.name", cfg.oracle.name),
             ("energy model", relaxed.energy_model, "the oracle's", cfg.oracle.energy_model),
             ("relax fmax", relaxed.fmax, "rss.fmax", rss.fmax),
             ("relax steps", relaxed.steps, "rss.steps", rss.steps),
             ("relax optimizer", relaxed.optimizer, "rss.optimizer", rss.optimizer)]
    differ = [f"{mine} {a} vs {theirs} {b}" for mine, a, theirs, b in pairs if a != b]
    if not differ and rss.steps <= 1:  # atomate2's ASE jobs treat steps <= 1 as a single point, relax_atoms does not
        differ.append(f"rss.steps {rss.steps}: the relax stage's jobs would be single points")
    if not differ:
        return None
    return f"the relax stage's relaxations were not reused, their settings differ ({'; '.join(differ)})"


def reusable_relaxations(store: ResultsStore, relaxed: RelaxResult, candidates: list[StructureDoc]
                         ) -> dict[str, StructureDoc]:
    """parent id -> the relax stage's finished child of each of `candidates` it relaxed. A failed or lost one is
    left to the evaluation, which relaxes (or retries) it as its own."""
    wanted = {c.doc_id for c in candidates}
    crit = {"doc_id": {"$in": relaxed.doc_ids}, "parent_id": {"$in": sorted(wanted)}}
    return {d.parent_id: d for d in store.find(crit) if not d.error and d.energy is not None}


def _candidate_targets(store: ResultsStore, relaxed: RelaxResult) -> set[str]:
    rows = store.find_raw({"doc_id": {"$in": relaxed.candidate_ids}}, properties=["system_id", "composition"])
    return {relax_target_key(r["system_id"], r["composition"]) for r in rows}
