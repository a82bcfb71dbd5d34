"""Relaxation of candidate slabs through jobflow + atomate2, with any oracle of the registry.

Every in-process oracle (EMT, CHGNet, SevenNet, GPAW, and any registered later) relaxes in an atomate2 ASE job
with the calculator the registry builds; CHGNet/SevenNet in atomate2's force-field job, GPAW with its k-points
made per structure. VASP (the jobflow route) has its own maker.

One atomate2 job per candidate, so the same flow runs locally (`run_relax_flow`) or on a cluster
(jobflow-remote). Substrate atoms to hold are marked by the pymatgen site property
'selective_dynamics' (False = fixed):
  * ASE-based makers: atomate2 converts structures with pymatgen's AseAtomsAdaptor, which turns
    selective dynamics into FixAtoms/FixCartesian; `fix_symmetry` is kept off because atomate2 would
    then *replace* those constraints with FixSymmetry.
  * VASP: the POSCAR carries the selective-dynamics flags, ISIF=2 keeps the cell.
Every job carries `metadata['surfdiff'] = {'index', 'method', 'metadata'}` so outcomes map back to
the inputs, and a unique name so a failure logged by jobflow maps back to its job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jobflow import Flow, Job, JobStore, run_locally
from maggma.core import Store
from maggma.stores import MemoryStore
from pymatgen.core import Structure

from surfdiff_core.oracles import (
    OracleError,
    available_oracles,
    get_oracle_spec,
    require_oracle,
)

if TYPE_CHECKING:
    pass

from surfdiff_core.relax.makers import JOBFLOW_MAKERS, ase_maker, split_settings, vasp_maker

logger = logging.getLogger(__name__)

# jobflow.managers.local logs a failed job as "<job name> failed with exception:\n<traceback>".
_FAILED_MARK = " failed with exception:\n"


@dataclass
class RelaxOutcome:
    index: int  # position in the structures given to make_relax_flow
    metadata: dict[str, Any]
    success: bool
    method: str
    job_uuid: str
    input_structure: Structure | None = None
    structure: Structure | None = None  # final, sites in the order of the input structure
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # [n, 3] eV/Å; ASE makers: zero on fixed atoms (FixAtoms applied)
    steps: int | None = None
    converged: bool | None = None  # None when the job document does not say
    error: str | None = None  # last line of the exception (type: message)
    traceback: str | None = None
    job_dir: str | None = None

    @property
    def uuid(self) -> str:
        """The jobflow job uuid (alias of job_uuid)."""
        return self.job_uuid


def relax_methods() -> tuple[str, ...]:
    """The relaxation methods: every oracle of the registry (read when asked, so registered ones count)."""
    return tuple(available_oracles())


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registry's names now, not when this module was imported
        return relax_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_relax_flow(
    structures: Sequence[tuple[Structure, dict[str, Any]] | Structure],
    method: str,
    settings: dict | None = None,
) -> Flow:
    """A jobflow Flow with one atomate2 relaxation job per (structure, metadata).

    settings: 'fmax' (eV/Å, default 0.05), 'steps' (200; atomate2's ASE makers treat steps <= 1 as a
    single point), 'optimizer' (ASE methods: BFGS|FIRE|LBFGS),
    plus the oracle settings of `method` (see surfdiff_core.oracles; for vasp: 'incar' overrides on top
    of VASP_SLAB_INCAR, 'kpts' or 'kpts_density', 'potcar_functional', 'user_potcar_settings',
    'run_vasp_kwargs', 'write_input_set_kwargs').
    """
    methods = relax_methods()
    if method not in methods:
        raise OracleError(f"unknown relaxation method {method!r}; valid: {', '.join(methods)}")
    spec = get_oracle_spec(method)
    if not spec.in_process and method not in JOBFLOW_MAKERS:
        raise OracleError(f"oracle {method!r} has no relaxation maker: a jobflow-route oracle needs one in "
                          f"surfdiff_core/relax/makers.py")
    require_oracle(method)  # one clear line now rather than a failed job per structure later
    relax, resolved = split_settings(method, settings)
    # ASE-based methods share one maker; VASP needs one per structure (k-points from each cell).
    shared = ase_maker(method, relax, resolved) if spec.in_process else None

    jobs: list[Job] = []
    for index, item in enumerate(structures):
        structure, meta = (item, {}) if isinstance(item, Structure) else item
        if not isinstance(structure, Structure):
            raise TypeError(f"item {index}: expected a pymatgen Structure, got {type(structure).__name__}")
        if "selective_dynamics" not in structure.site_properties:
            logger.warning("structure %d has no 'selective_dynamics': no atom will be held fixed", index)
        maker = shared if shared is not None else vasp_maker(structure, relax, resolved)
        job = maker.make(structure)
        job.name = f"{job.name} #{index} [{job.uuid[:8]}]"  # unique: failures are reported by name
        job.update_metadata({"surfdiff": {"index": index, "method": method, "metadata": dict(meta)}})
        jobs.append(job)
    return Flow(jobs, name=f"surfdiff {method} relaxation ({len(jobs)} structures)")


# ---- running --------------------------------------------------------------------------------------------
def run_relax_flow(
    flow: Flow,
    store: Store | None = None,
    *,
    root_dir: str | Path | None = None,
    additional_stores: dict[str, Store] | None = None,
    log: bool = False,
) -> list[RelaxOutcome]:
    """Run `flow` with jobflow.run_locally into a JobStore on `store`; one outcome per relaxation job.

    A job that raises is recorded as a failure with its error (the others go on). Each job runs in its
    own folder under `root_dir`. By default that is a new temporary directory, removed once the outcomes are
    read unless a job failed (then it is kept for the post-mortem, and its path is logged and is the failed
    outcomes' job_dir) or SURFDIFF_KEEP_RELAX_DIRS=1; a `root_dir` the caller gives is never removed.
    Large objects (trajectories, VASP volumetric data) go to additional_stores, by default a 'data'
    store next to `store`.
    """
    temporary = root_dir is None
    if root_dir is None:
        root_dir = tempfile.mkdtemp(prefix="surfdiff-relax-")
        logger.info("relaxation job folders in %s", root_dir)
    try:
        outcomes = _run_and_read(flow, store, root_dir, additional_stores, log)
    except BaseException:
        if temporary:
            logger.warning("relaxation job folders kept in %s", root_dir)
        raise
    failed = [o for o in outcomes if not o.success]
    if temporary and failed:
        for o in outcomes:  # the failures' folders stay (jobflow does not say which one is whose)
            if o.success and o.job_dir and Path(o.job_dir).resolve().is_relative_to(Path(root_dir).resolve()):
                shutil.rmtree(o.job_dir, ignore_errors=True)
                o.job_dir = None
            elif not o.success:
                o.job_dir = o.job_dir or str(root_dir)
        logger.warning("%d of %d relaxations failed; their job folders are kept in %s", len(failed),
                       len(outcomes), root_dir)
    elif temporary and os.environ.get("SURFDIFF_KEEP_RELAX_DIRS", "") not in ("", "0"):
        logger.warning("relaxation job folders kept in %s (SURFDIFF_KEEP_RELAX_DIRS)", root_dir)
    elif temporary:
        shutil.rmtree(root_dir, ignore_errors=True)
        for o in outcomes:
            o.job_dir = None  # removed with the temporary directory
    return outcomes


def _run_and_read(
    flow: Flow, store: Store | None, root_dir: str | Path, additional_stores: dict[str, Store] | None, log: bool
) -> list[RelaxOutcome]:
    docs_store = store if store is not None else MemoryStore(collection_name="surfdiff_relax")
    if additional_stores is None:
        additional_stores = {"data": _sibling_store(docs_store, "data")}
    for s in (docs_store, *additional_stores.values()):
        _tolerate_missing_ensure_index(s)
    job_store = JobStore(docs_store, additional_stores=additional_stores)
    relax_jobs = [j for j in _iter_jobs(flow) if "surfdiff" in (j.metadata or {})]

    with _capture_job_failures(propagate=log) as failures:
        responses = run_locally(
            flow, store=job_store, create_folders=True, root_dir=root_dir, ensure_success=False, log=log
        )

    outcomes = []
    for job in sorted(relax_jobs, key=lambda j: j.metadata["surfdiff"]["index"]):
        tag = job.metadata["surfdiff"]
        input_structure = job.function_args[0] if job.function_args else None
        base = {
            "index": int(tag["index"]), "metadata": dict(tag.get("metadata") or {}), "method": tag["method"],
            "job_uuid": job.uuid,
            "input_structure": input_structure if isinstance(input_structure, Structure) else None,
        }
        if job.uuid in responses:
            response = responses[job.uuid][max(responses[job.uuid])]
            job_dir = str(response.job_dir) if response.job_dir is not None else None
            try:
                output = job_store.get_output(job.uuid, load=False)
                outcomes.append(_in_input_order(_outcome_from_output(output, base, job_dir)))
            except Exception as exc:  # noqa: BLE001 - a document we cannot read is a failure, not a crash
                outcomes.append(RelaxOutcome(**base, success=False, error=f"unreadable output: {exc}"))
            continue
        tb = failures.get(job.name)
        error = tb.strip().splitlines()[-1] if tb else "job did not run (no response from jobflow)"
        logger.warning("relaxation %d (%s) failed: %s", base["index"], base["method"], error)
        outcomes.append(RelaxOutcome(**base, success=False, error=error, traceback=tb))
    return outcomes


def _outcome_from_output(output: Any, base: dict[str, Any], job_dir: str | None) -> RelaxOutcome:
    """Read an atomate2 ASE/force-field task document or a VASP TaskDoc (object or dict)."""
    out = _get(output, "output")
    structure = _as_structure(_get(output, "structure")) or _as_structure(_get(out, "structure"))
    energy = _get(out, "energy")
    forces = _get(out, "forces")
    converged = _get(output, "is_force_converged")
    # Steps are optimiser steps, as in relax_atoms. atomate2's ASE n_steps counts trajectory frames:
    # the initial one, one per step, and the final one again (a single frame for static runs).
    frames = _get(out, "n_steps")
    steps = None if frames is None else max(int(frames) - 2, 0)
    if frames is None:  # VASP: ionic steps of the last calculation, the first is the input geometry
        calcs = _get(output, "calcs_reversed") or []
        ionic = _get(_get(calcs[0], "output"), "ionic_steps") if calcs else None
        steps = max(len(ionic) - 1, 0) if ionic is not None else None
    if energy is None or structure is None:
        return RelaxOutcome(
            **base, success=False, structure=structure, job_dir=job_dir,
            error="job finished but its document has no final energy/structure",
        )
    return RelaxOutcome(
        **base, success=True, structure=structure, energy=float(energy),
        forces=None if forces is None else np.asarray(forces, dtype=float),
        steps=None if steps is None else int(steps),
        converged=None if converged is None else bool(converged), job_dir=job_dir,
    )


def _in_input_order(out: RelaxOutcome) -> RelaxOutcome:
    """Undo the species sort of VASP input sets, so that sites and forces line up with the input.

    atomate2's VASP generator sorts sites by electronegativity (a stable sort): the same sort of the
    input gives the permutation. Outputs already in input order (ASE makers) are left alone.
    """
    src, final = out.input_structure, out.structure
    if src is None or final is None or len(src) != len(final):
        return out
    if [site.species for site in src] == [site.species for site in final]:
        return out
    perm = sorted(range(len(src)), key=lambda i: src[i].species.average_electroneg)
    if [src[i].species for i in perm] != [site.species for site in final]:
        logger.warning("relaxation %d: output sites are not a species sort of the input; order kept", out.index)
        return out
    inverse = np.argsort(perm)  # input index i sits at position inverse[i] of the output
    out.structure = Structure.from_sites([final[int(k)] for k in inverse])
    if out.forces is not None and len(out.forces) == len(src):
        out.forces = np.asarray(out.forces)[inverse]
    return out


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_structure(obj: Any) -> Structure | None:
    if obj is None or isinstance(obj, Structure):
        return obj
    if isinstance(obj, Mapping):
        return Structure.from_dict(obj)
    return None


def _iter_jobs(flow: Flow | Job) -> Iterator[Job]:
    if isinstance(flow, Job):
        yield flow
        return
    for item in flow.jobs:
        yield from _iter_jobs(item)


def _sibling_store(store: Store, suffix: str) -> Store:
    """A store of the same kind and location as `store`, collection '<name>_<suffix>'."""
    spec = store.as_dict()
    if "collection_name" not in spec:
        kind = type(store).__name__
        raise OracleError(f"cannot derive a '{suffix}' store from {kind}; pass additional_stores")
    spec["collection_name"] = f"{spec['collection_name']}_{suffix}"
    return type(store).from_dict(spec)


def _tolerate_missing_ensure_index(store: Store) -> None:
    """montydb (MontyStore) has no index_information: ensure_index raises NotImplementedError.

    Indexes only speed up queries, so a backend without them gets a no-op instead.
    """
    original = store.ensure_index
    if getattr(original, "_surfdiff_tolerant", False):
        return

    def ensure_index(key: str, unique: bool | None = False) -> bool:
        try:
            return original(key, unique=unique)
        except NotImplementedError:
            return False

    ensure_index._surfdiff_tolerant = True  # type: ignore[attr-defined]
    store.ensure_index = ensure_index  # type: ignore[method-assign]


class _FailureHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.failures: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if _FAILED_MARK in msg:
            name, tb = msg.split(_FAILED_MARK, 1)
            self.failures[name] = tb


@contextlib.contextmanager
def _capture_job_failures(propagate: bool) -> Iterator[dict[str, str]]:
    """Collect {job name: traceback} from jobflow's local manager, which logs failures instead of raising."""
    local_logger = logging.getLogger("jobflow.managers.local")
    handler = _FailureHandler()
    old_level, old_propagate = local_logger.level, local_logger.propagate
    local_logger.addHandler(handler)
    local_logger.setLevel(logging.INFO)  # failures are logged at INFO
    if not propagate:  # quiet unless asked: failures are reported in the outcomes (and one warning each)
        local_logger.propagate = False
    try:
        yield handler.failures
    finally:
        local_logger.removeHandler(handler)
        local_logger.setLevel(old_level)
        local_logger.propagate = old_propagate
