"""The calculators behind the oracle registry's built-in entries, and the settings they need.

Each factory takes the resolved settings of its oracle (surfdiff_core.oracles.registry.resolve_settings) and
imports its optional package only when called.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from surfdiff_core.oracles.errors import OracleError

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator


def emt_factory(s: dict[str, Any]) -> Calculator:
    from ase.calculators.emt import EMT

    return EMT(asap_cutoff=bool(s["asap_cutoff"]))


_MODEL_FILE_SUFFIXES = (".pth", ".tar", ".pt")


def chgnet_packaged(model: Any) -> bool:
    """A version name ('0.3.0') loads weights shipped inside the package; anything else is a file path."""
    return model is None or (isinstance(model, str) and not model.endswith(_MODEL_FILE_SUFFIXES))


def sevennet_packaged(model: Any) -> bool:
    """SevenNet takes any name it does not know as a checkpoint path."""
    if not isinstance(model, str):
        return False
    try:
        from sevenn.util import pretrained_name_to_path
    except ImportError:  # not installed (require_oracle says so); judge by the name alone
        return "/" not in model and "\\" not in model and not model.endswith(_MODEL_FILE_SUFFIXES)
    try:
        pretrained_name_to_path(model)
    except ValueError:
        return False
    return True


# Oracles whose `model` setting may name a file, which their packages load with torch.load(weights_only=False):
# unpickling runs any code the file holds, so only packaged weights load unless the config trusts the file
# (OracleSpec.packaged_model tells which values are packaged).
TRUST_MODEL_FILE = "trust_model_file"


def chgnet_task(properties: Iterable[str] | None) -> str:
    """The CHGNet prediction task for the ASE properties asked: energy and forces unless the stress (a cell
    derivative, about 40 % of a call) or magnetic moments are asked; a slab relaxation at fixed cell never is."""
    wanted = set(properties or ())
    if "magmoms" in wanted:
        return "efsm"
    return "efs" if "stress" in wanted else "ef"


def chgnet_factory(s: dict[str, Any]) -> Calculator:
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    class AskedCHGNetCalculator(CHGNetCalculator):
        """CHGNet's ASE calculator computing only the properties asked (it always computes all four)."""

        def calculate(self, atoms=None, properties=None, system_changes=None, task=None) -> None:
            super().calculate(atoms, properties, system_changes, task=task or chgnet_task(properties))

    model = s["model"]
    # CHGNet prints its size and device whatever `verbose` says: one pair of lines per worker process and per load
    with contextlib.redirect_stdout(io.StringIO()):
        if chgnet_packaged(model):
            net = CHGNet.load(model_name=model or "0.3.0", use_device=s["device"], verbose=False)
        else:
            net = CHGNet.from_file(str(model), verbose=False)
        return AskedCHGNetCalculator(model=net, use_device=s["device"])


def sevennet_factory(s: dict[str, Any]) -> Calculator:
    from sevenn.calculator import SevenNetCalculator

    kwargs: dict[str, Any] = {"model": s["model"], "device": s["device"]}
    if s["modal"] is not None:
        kwargs["modal"] = s["modal"]
    return SevenNetCalculator(**kwargs)


_GPAW_SMEARINGS = ("fermi-dirac", "marzari-vanderbilt", "methfessel-paxton")


def gpaw_parameters(s: Mapping[str, Any], kpts: Sequence[int] | None = None) -> dict[str, Any]:
    """GPAW keyword arguments for resolved gpaw settings; `kpts` (explicit mesh) overrides the settings."""
    if s["smearing"] not in _GPAW_SMEARINGS:
        raise OracleError(f"gpaw smearing must be one of {list(_GPAW_SMEARINGS)}, got {s['smearing']!r}")
    occupations: dict[str, Any] = {"name": s["smearing"], "width": float(s["smearing_width"])}
    if s["smearing"] == "methfessel-paxton":
        occupations["order"] = 1
    if kpts is None:
        kpts = s["kpts"]
    # A density gives 1 k-point along non-periodic directions (slabs with pbc=(1, 1, 0)).
    kpt_arg: Any = {"density": float(s["kpts_density"]), "gamma": True}
    if kpts is not None:
        kpt_arg = tuple(int(k) for k in kpts)
    params: dict[str, Any] = {
        "mode": {"name": "pw", "ecut": float(s["ecut"])},
        "xc": s["xc"],
        "kpts": kpt_arg,
        "occupations": occupations,
        "spinpol": bool(s["spinpol"]),
        "maxiter": int(s["maxiter"]),
        "txt": s["txt"],
    }
    # Relaxations break the initial symmetry (adsorbates move), so symmetry is off by default.
    if s["symmetry"] == "off":
        params["symmetry"] = "off"
    elif s["symmetry"] != "on":
        raise OracleError(f"gpaw symmetry must be 'on' or 'off', got {s['symmetry']!r}")
    if s["convergence"]:
        params["convergence"] = dict(s["convergence"])
    return params


def gpaw_factory(s: dict[str, Any]) -> Calculator:
    from gpaw import GPAW

    return GPAW(**gpaw_parameters(s))


# Slab relaxation defaults for VASP; every key can be overridden through settings['incar'].
VASP_SLAB_INCAR: dict[str, Any] = {
    "ISIF": 2,  # ions only: the in-plane cell is the substrate's, the vacuum must not collapse
    "IBRION": 2,
    "NSW": 200,
    "EDIFF": 1e-5,
    "EDIFFG": -0.05,
    "ENCUT": 450,
    "ISMEAR": 1,  # metal slabs: Methfessel-Paxton, not tetrahedra (1 k-point along z)
    "SIGMA": 0.1,
    "LDIPOL": True,  # dipole correction along the surface normal (DIPOL: slab centre, set per structure)
    "IDIPOL": 3,
    "ISYM": 0,
    "LREAL": "Auto",
    "LWAVE": False,
    "LCHARG": False,
    "LAECHG": False,  # atomate2's base set writes AECCARs and LOCPOT; a relaxation needs neither
    "LVTOT": False,
}


def emt_elements() -> frozenset[str]:
    from ase.calculators.emt import parameters

    return frozenset(parameters)


def chgnet_elements() -> frozenset[str]:
    from ase.data import chemical_symbols

    # CHGNet embeds atoms by atomic number in a table of 94 rows (H..Pu).
    return frozenset(chemical_symbols[1:95])


# The built-in oracles. SevenNet's species live in its checkpoint, GPAW's and VASP's in the installed setups and
# POTCARs: surfdiff cannot tell theirs without running them (elements None).


def kpts_from_cell(
    cell: Any, density: float, pbc: Sequence[bool] = (True, True, False)
) -> tuple[int, int, int]:
    """Monkhorst-Pack mesh with `density` k-points per Å⁻¹ (ASE convention, n = ceil(2π|b_i|·density)).

    Directions with pbc False (the slab normal) get 1 k-point even when the cell is treated as periodic.
    """
    recip = np.linalg.inv(np.asarray(cell, dtype=float)).T  # rows b_i without the 2π
    mesh = []
    for i in range(3):
        if not pbc[i]:
            mesh.append(1)
            continue
        mesh.append(max(1, math.ceil(2 * math.pi * float(np.linalg.norm(recip[i])) * density - 1e-9)))
    return mesh[0], mesh[1], mesh[2]


# ---- helpers --------------------------------------------------------------------------------------------
