"""Relaxation stage: the best K distinct generated candidates per (system, composition), relaxed with an
oracle or DFT through jobflow.

Candidates are already MLFF-relaxed by the sampler; here they go through atomate2 makers (EMT, CHGNet,
SevenNet, GPAW locally; VASP under custodian on HPC) with the bottom substrate layers fixed via selective
dynamics. Results are `relaxed` (oracle) or `dft` (GPAW/VASP) documents whose parent is the generated one;
failed jobs are recorded with their error. Ids are deterministic, so a rerun skips finished relaxations and
retries failed ones up to relax.max_attempts times (see surfdiff_core.retry).
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from surfdiff_core.config import RelaxConfig, SurfdiffConfig
from surfdiff_core.evaluate.matching import deduplicate
from surfdiff_core.remote import run_on
from surfdiff_core.retry import attempt_meta, claimed_work, plan_work
from surfdiff_core.stages.common import jobs_store_for, new_run_id, sample_targets, target_system
from surfdiff_core.stages.results import RelaxResult, SampleResult, relax_target_key
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import now

if TYPE_CHECKING:
    from surfdiff_core.relax.jobflow_relax import RelaxOutcome


def top_candidates(docs: list[StructureDoc], top_k: int) -> list[StructureDoc]:
    """The K lowest-MLFF-energy valid samples per (system, composition), K distinct structures (StructureMatcher
    on the slab): the expensive step never relaxes one structure twice."""
    groups: dict[tuple[str, str], list[StructureDoc]] = {}
    for d in sorted(docs, key=lambda d: (d.energy, d.doc_id)):  # ties in a fixed order: reruns pick the same
        if d.valid and d.in_box and d.energy is not None:
            groups.setdefault((d.system_id, d.composition), []).append(d)
    return [d for g in groups.values() for d in deduplicate(g, k=top_k)]


def select_candidates(cfg: SurfdiffConfig, store: ResultsStore, upstream: SampleResult | None = None, *,
                      top_k: int, model_id: str | None = None, run_id: str | None = None) -> list[StructureDoc]:
    """Candidates of this study only: the sample stage's documents, or (standalone) the samples of the
    study's model (a named one, or the newest registered) for the config's targets."""
    if upstream is not None:
        docs = list(store.find({"doc_id": {"$in": upstream.doc_ids}, "study": cfg.name}))
        return top_candidates(docs, top_k)
    from surfdiff_core.stages.sample import resolve_model

    model = resolve_model(cfg, model_id=model_id)
    crit: dict = {"source": "generated", "study": cfg.name, "model_id": model.model_id, "valid": True,
                  "in_box": True, "energy": {"$ne": None},
                  "system_id": {"$in": sorted({target_system(cfg, t).system_id for t in sample_targets(cfg)})}}
    if run_id:
        crit["run_id"] = run_id
    return top_candidates(list(store.find(crit)), top_k)


def relaxation_source(method: str) -> str:
    """`dft` for an oracle the registry marks as electronic-structure (GPAW, VASP), else `relaxed`."""
    from surfdiff_core.oracles import get_oracle_spec

    return "dft" if get_oracle_spec(method).dft else "relaxed"


def relaxed_doc_id(parent: StructureDoc, rcfg: RelaxConfig) -> str:
    source = relaxation_source(rcfg.method)
    settings = json.dumps(rcfg.settings, sort_keys=True, default=str)
    return make_doc_id(source, parent.doc_id, rcfg.method, settings, rcfg.fmax, rcfg.steps)


def candidate_structure(doc: StructureDoc):
    """pymatgen Structure with selective dynamics: the fixed bottom layers cannot move."""
    s = doc.to_structure()
    fixed = set(doc.fixed)
    s.add_site_property("selective_dynamics", [[i not in fixed] * 3 for i in range(len(s))])
    return s


def run(cfg: SurfdiffConfig, store: ResultsStore, upstream: SampleResult | None = None, *,
        rcfg: RelaxConfig | None = None, candidates: list[StructureDoc] | None = None, run_id: str | None = None,
        model_id: str | None = None, jobs_store=None, executor: Executor | None = None) -> RelaxResult:
    """Relax the best candidates (of `upstream`, or selected for this study) with the oracle or DFT.

    `executor` (any concurrent.futures.Executor, e.g. the Slurm one of deploy/) relaxes each candidate
    elsewhere (`relax_remote`); a candidate whose job is lost is reported in `lost`, not stored, so a rerun
    redoes it. By default they run here, one jobflow flow per candidate as this process claims it (another
    relax stage on the store takes the others)."""
    from surfdiff_core.relax.jobflow_relax import make_relax_flow
    from surfdiff_core.relax.makers import split_settings

    rcfg = rcfg or cfg.relax
    run_id = run_id or (upstream.run_id if upstream else new_run_id())
    targets = _targets(cfg, upstream, candidates)
    if candidates is None:
        candidates = select_candidates(cfg, store, upstream, top_k=rcfg.top_k, model_id=model_id)
    settings = {"fmax": rcfg.fmax, "steps": rcfg.steps, **rcfg.settings}
    relaxer, _ = split_settings(rcfg.method, settings)  # what the jobs run with (relax.settings may override)
    summary = RelaxResult(study=cfg.name, run_id=run_id, config_hash=cfg.section_hash("relax"),
                          method=rcfg.method, energy_model=rcfg.energy_model, candidates=len(candidates),
                          candidate_ids=[d.doc_id for d in candidates], fmax=float(relaxer["fmax"]),
                          steps=int(relaxer["steps"]), optimizer=relaxer.get("optimizer"), target_keys=targets)
    ids = {d.doc_id: relaxed_doc_id(d, rcfg) for d in candidates}
    work = plan_work(store, ids.values(), rcfg.max_attempts)
    todo = [d for d in candidates if ids[d.doc_id] not in work.finished]
    summary.skipped = len(candidates) - len(todo)
    summary.retried, summary.given_up = len(work.retry), len(work.given_up)
    summary.doc_ids = list(ids.values())
    if todo:
        inputs = [(candidate_structure(d), {"parent_id": d.doc_id, "doc_id": ids[d.doc_id]}) for d in todo]
        by_parent = {d.doc_id: d for d in todo}

        def record(out: RelaxOutcome) -> None:
            parent = by_parent[out.metadata["parent_id"]]
            doc = _relaxed_doc(parent, out, rcfg, ids[parent.doc_id], run_id, cfg.name)
            doc.meta.update(attempt_meta(work.retry.get(doc.doc_id), doc.error))
            store.put(doc)
            if doc.error:
                summary.failed += 1
            else:
                summary.relaxed += 1

        by_id = {meta["doc_id"]: (structure, meta) for structure, meta in inputs}
        # Claimed one by one, so that two relax stages on one store never relax a candidate twice
        queue = claimed_work(store, list(by_id), work, rcfg.max_attempts)
        try:
            with queue:
                if executor is not None:  # one job per candidate, every one submitted at once
                    run_on(executor, queue, len(inputs),
                           lambda doc_id: (relax_remote, (*by_id[doc_id], rcfg.method, settings)),
                           lambda _, out: record(out), summary.lost.__setitem__)
                else:  # here, one jobflow flow per candidate as it is claimed
                    jobs_store = jobs_store_for(cfg) if jobs_store is None else jobs_store
                    while (doc_id := queue.next()) is not None:
                        (out,) = _run_flow(make_relax_flow([by_id[doc_id]], rcfg.method, settings), jobs_store)
                        record(out)
                        queue.done(doc_id)
        finally:
            summary.by_others = queue.elsewhere
        summary.failed += len(summary.lost)
    for d in store.find({"doc_id": {"$in": list(ids.values())}}):
        if d.energy is not None and not d.error:
            key = f"{d.composition} {d.cell}"
            summary.best[key] = min(summary.best.get(key, np.inf), d.energy)
    return summary


def _targets(cfg: SurfdiffConfig, upstream: SampleResult | None,
             candidates: list[StructureDoc] | None) -> list[str]:
    """The targets the candidates were chosen for: the sample stage's, those of the candidates handed in, or
    (neither) the config's, as select_candidates chooses them."""
    if upstream is not None:
        pairs = {(t.system_id, t.composition) for t in upstream.targets}
    elif candidates is not None:
        pairs = {(d.system_id, d.composition) for d in candidates}
    else:
        systems = [target_system(cfg, t) for t in sample_targets(cfg)]
        pairs = {(s.system_id, s.composition) for s in systems}
    return sorted(relax_target_key(*p) for p in pairs)


def _run_flow(flow, jobs_store) -> list[RelaxOutcome]:
    from surfdiff_core.relax.jobflow_relax import run_relax_flow

    with warnings.catch_warnings():  # jobflow's notes on independent jobs and its own deprecations
        warnings.filterwarnings("ignore", message="Some jobs are not connected")
        warnings.filterwarnings("ignore", category=FutureWarning, module="jobflow")
        return run_relax_flow(flow, jobs_store)


def relax_remote(structure, meta: dict, method: str, settings: dict):
    """What an executor runs (a Slurm job): one candidate's jobflow relaxation, here, into a MemoryStore."""
    from maggma.stores import MemoryStore

    from surfdiff_core.relax.jobflow_relax import make_relax_flow

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="jobflow")
        flow = make_relax_flow([(structure, meta)], method, settings)
    (outcome,) = _run_flow(flow, MemoryStore(collection_name="surfdiff_relax"))
    return outcome


def _relaxed_doc(parent: StructureDoc, out, rcfg: RelaxConfig, doc_id: str, run_id: str | None,
                 study: str) -> StructureDoc:
    from surfdiff_core.relax.records import Relaxed, parent_fields, relaxation_record

    fields = dict(doc_id=doc_id, source=relaxation_source(rcfg.method), oracle=rcfg.method,
                  oracle_settings=rcfg.settings, study=study, energy_model=rcfg.energy_model, run_id=run_id,
                  **parent_fields(parent, "config_hash"))
    box = (parent.n_substrate, parent.z_box)
    if out.success and out.structure is not None:
        meta = {"jobflow_uuid": out.uuid, "parent_energy": parent.energy, "relaxed_at": now().isoformat()}
        return relaxation_record(Relaxed.from_outcome(out, parent.fixed), parent.structure, box=box,
                                 keep_start=True, meta=meta, **fields)
    return relaxation_record(out.error or "relaxation failed", parent.structure, box=box,
                             meta={"jobflow_uuid": out.uuid}, **fields)
