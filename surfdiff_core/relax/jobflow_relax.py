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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from atomate2.ase.jobs import AseRelaxMaker
from atomate2.forcefields.jobs import ForceFieldRelaxMaker
from jobflow import Flow, Job, JobStore, run_locally
from maggma.core import Store
from maggma.stores import MemoryStore
from pymatgen.core import Structure
from threadpoolctl import threadpool_limits

from surfdiff_core.oracles import (
    VASP_SLAB_INCAR,
    OracleError,
    available_oracles,
    get_calculator,
    get_oracle_spec,
    gpaw_parameters,
    kpts_from_cell,
    require_oracle,
    resolve_settings,
)

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from atomate2.ase.schemas import AseResult
    from pymatgen.core import Molecule

logger = logging.getLogger(__name__)

RELAX_DEFAULTS: dict[str, Any] = {"fmax": 0.05, "steps": 200, "optimizer": "BFGS"}
# In-process oracles that relax in atomate2's force-field job (its documents name the force field); every other
# in-process oracle relaxes in OracleRelaxMaker, GPAW in GpawRelaxMaker.
_FORCE_FIELD_NAMES = {"chgnet": "CHGNet", "sevennet": "SevenNet"}
# Oracles of the jobflow route, each with the function making its maker for one structure (see _vasp_maker).
_JOBFLOW_MAKERS = ("vasp",)
_SLAB_PBC = (True, True, False)  # the third cell vector is the surface normal: 1 k-point along it
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


# ---- makers ---------------------------------------------------------------------------------------------
@dataclass
class OracleRelaxMaker(AseRelaxMaker):
    """atomate2's ASE relaxation with the calculator of any in-process oracle of the registry (built from the
    resolved settings by its factory). Cell fixed: slabs keep the substrate's in-plane cell."""

    name: str = "surfdiff oracle relax"
    oracle: str = "emt"
    oracle_settings: dict = field(default_factory=dict)
    relax_cell: bool = False

    def _get_calculator(self) -> Calculator:
        return get_calculator(self.oracle, **self.oracle_settings)


@dataclass
class OracleForceFieldRelaxMaker(ForceFieldRelaxMaker):
    """atomate2's force-field relaxation with the calculator built by the surfdiff oracle registry.

    The registry loads the weights shipped inside chgnet/sevenn on the CPU (no downloads) and keeps one
    definition of each oracle's settings. Cell fixed: slabs keep the substrate's in-plane cell.
    """

    name: str = "surfdiff force-field relax"
    oracle: str = "chgnet"
    oracle_settings: dict = field(default_factory=dict)
    relax_cell: bool = False

    def _get_calculator(self) -> Calculator:
        return get_calculator(self.oracle, **self.oracle_settings)


@dataclass
class GpawRelaxMaker(AseRelaxMaker):
    """Plane-wave GPAW relaxation of a slab as an atomate2 ASE job (FixAtoms from selective dynamics).

    The k-point mesh is made per structure from its cell with 1 k-point along the surface normal,
    unless `gpaw_settings['kpts']` is explicit. Output: atomate2's AseStructureTaskDoc (final
    structure, energy, forces, number of steps, trajectory in the 'data' store).
    """

    name: str = "GPAW relaxation"
    gpaw_settings: dict = field(default_factory=dict)
    relax_cell: bool = False

    def _get_calculator(self) -> Calculator:
        return get_calculator("gpaw", **self.gpaw_settings)

    def run_ase(self, mol_or_struct: Structure | Molecule, prev_dir: str | Path | None = None) -> AseResult:
        from gpaw import GPAW

        s = resolve_settings("gpaw", self.gpaw_settings)
        kpts = s["kpts"]
        if kpts is None and isinstance(mol_or_struct, Structure):
            kpts = kpts_from_cell(mol_or_struct.lattice.matrix, s["kpts_density"], _SLAB_PBC)
        self._calculator = GPAW(**gpaw_parameters(s, kpts))
        # GPAW parallelises with MPI; threaded BLAS on its small matrices is many times slower.
        with threadpool_limits(1, user_api="blas"):
            return super().run_ase(mol_or_struct, prev_dir=prev_dir)


def _split_settings(method: str, settings: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(relaxation settings, resolved oracle settings); unknown keys raise OracleError."""
    settings = dict(settings or {})
    in_process = get_oracle_spec(method).in_process
    if not in_process and "optimizer" in settings:
        hint = " (set IBRION through settings['incar'])" if method == "vasp" else ""
        raise OracleError(f"setting 'optimizer' does not apply to {method}{hint}")
    relax_keys = tuple(RELAX_DEFAULTS) if in_process else ("fmax", "steps")
    relax = {k: settings.pop(k, RELAX_DEFAULTS[k]) for k in relax_keys}
    if float(relax["fmax"]) <= 0 or int(relax["steps"]) < 0:
        raise OracleError("relaxation settings need fmax > 0 and steps >= 0")
    if relax.get("optimizer", "BFGS") not in ("BFGS", "FIRE", "LBFGS"):
        raise OracleError(f"optimizer must be BFGS, FIRE or LBFGS, got {relax['optimizer']!r}")
    return relax, resolve_settings(method, settings)  # validates the remaining keys


def _vasp_maker(structure: Structure, relax: dict[str, Any], s: dict[str, Any]) -> Any:
    from atomate2.vasp.jobs.core import RelaxMaker
    from atomate2.vasp.sets.core import RelaxSetGenerator
    from pymatgen.io.vasp import Kpoints

    incar = {
        **VASP_SLAB_INCAR, "EDIFFG": -abs(float(relax["fmax"])), "NSW": int(relax["steps"]),
        "DIPOL": _dipole_centre(structure),
    }
    incar.update(s["incar"])
    kpts = s["kpts"] or kpts_from_cell(structure.lattice.matrix, s["kpts_density"], _SLAB_PBC)
    generator = RelaxSetGenerator(
        user_incar_settings=incar,
        user_kpoints_settings=Kpoints.gamma_automatic(tuple(int(k) for k in kpts)),
        user_potcar_functional=s["potcar_functional"],
        user_potcar_settings=dict(s["user_potcar_settings"]),
        # Our INCAR/KPOINTS are deliberate for metal slabs: no band-gap-based rewrites.
        auto_ismear=False,
        auto_metal_kpoints=False,
    )
    # run_vasp_kwargs are passed through: atomate2's run_vasp builds the custodian job with its
    # default handlers/validators unless settings override them.
    return RelaxMaker(
        name="VASP slab relaxation",
        input_set_generator=generator,
        run_vasp_kwargs=dict(s["run_vasp_kwargs"]),
        write_input_set_kwargs=dict(s["write_input_set_kwargs"]),
    )


def _dipole_centre(structure: Structure) -> list[float]:
    """Fractional centre of mass for VASP's DIPOL (the slab must not straddle the cell boundary in z)."""
    masses = np.array([site.species.weight for site in structure], dtype=float)
    frac = structure.frac_coords
    z = float(np.sum(masses * frac[:, 2]) / masses.sum())
    return [0.5, 0.5, round(z, 6)]


def _ase_maker(method: str, relax: dict[str, Any], oracle_settings: dict[str, Any]) -> Any:
    common: dict[str, Any] = {
        "relax_cell": False,
        "steps": int(relax["steps"]),
        "relax_kwargs": {"fmax": float(relax["fmax"])},
        "optimizer_kwargs": {"optimizer": relax["optimizer"]},
    }
    if method == "gpaw":
        return GpawRelaxMaker(gpaw_settings=dict(oracle_settings), **common)
    if method in _FORCE_FIELD_NAMES:
        return OracleForceFieldRelaxMaker(
            name=f"{_FORCE_FIELD_NAMES[method]} relaxation",
            force_field_name=_FORCE_FIELD_NAMES[method],
            oracle=method,
            oracle_settings=dict(oracle_settings),
            **common,
        )
    # Any other in-process oracle (EMT, one registered later): the registry's calculator in atomate2's ASE job.
    return OracleRelaxMaker(name=f"{method} relaxation", oracle=method, oracle_settings=dict(oracle_settings),
                            **common)


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
    if not spec.in_process and method not in _JOBFLOW_MAKERS:
        raise OracleError(f"oracle {method!r} has no relaxation maker: a jobflow-route oracle needs one in "
                          f"surfdiff_core/relax/jobflow_relax.py")
    require_oracle(method)  # one clear line now rather than a failed job per structure later
    relax, resolved = _split_settings(method, settings)
    # ASE-based methods share one maker; VASP needs one per structure (k-points from each cell).
    ase_maker = _ase_maker(method, relax, resolved) if spec.in_process else None

    jobs: list[Job] = []
    for index, item in enumerate(structures):
        structure, meta = (item, {}) if isinstance(item, Structure) else item
        if not isinstance(structure, Structure):
            raise TypeError(f"item {index}: expected a pymatgen Structure, got {type(structure).__name__}")
        if "selective_dynamics" not in structure.site_properties:
            logger.warning("structure %d has no 'selective_dynamics': no atom will be held fixed", index)
        maker = ase_maker if ase_maker is not None else _vasp_maker(structure, relax, resolved)
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
