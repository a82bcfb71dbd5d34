"""atomate2 makers for one relaxation per candidate slab, with the calculator of the oracle registry.

Every in-process oracle (EMT, CHGNet, SevenNet, GPAW, and any registered later) relaxes in an atomate2 ASE job
with the calculator the registry builds; CHGNet/SevenNet in atomate2's force-field job (its documents name the
force field), GPAW with its k-points made per structure; VASP (the jobflow route) has its own maker, made per
structure. surfdiff_core.relax.jobflow_relax composes them into a flow and runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from atomate2.ase.jobs import AseRelaxMaker
from atomate2.forcefields.jobs import ForceFieldRelaxMaker
from pymatgen.core import Structure
from threadpoolctl import threadpool_limits

from surfdiff_core.oracles import (
    VASP_SLAB_INCAR,
    OracleError,
    get_calculator,
    get_oracle_spec,
    gpaw_parameters,
    kpts_from_cell,
    resolve_settings,
)

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from atomate2.ase.schemas import AseResult
    from pymatgen.core import Molecule

RELAX_DEFAULTS: dict[str, Any] = {"fmax": 0.05, "steps": 200, "optimizer": "BFGS"}
# In-process oracles that relax in atomate2's force-field job (its documents name the force field); every other
# in-process oracle relaxes in OracleRelaxMaker, GPAW in GpawRelaxMaker.
_FORCE_FIELD_NAMES = {"chgnet": "CHGNet", "sevennet": "SevenNet"}
# Oracles of the jobflow route, each with the function making its maker for one structure (see vasp_maker).
JOBFLOW_MAKERS = ("vasp",)
_SLAB_PBC = (True, True, False)  # the third cell vector is the surface normal: 1 k-point along it
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


def split_settings(method: str, settings: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
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


def vasp_maker(structure: Structure, relax: dict[str, Any], s: dict[str, Any]) -> Any:
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


def ase_maker(method: str, relax: dict[str, Any], oracle_settings: dict[str, Any]) -> Any:
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
