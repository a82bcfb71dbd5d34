"""Energy models ("oracles"): emt, chgnet, sevennet, gpaw (in-process ASE calculators), vasp (jobflow only).

    calc = get_calculator("chgnet", device="cpu")
    bulk_lattice_constant("Ag", "fcc", "emt")  # {'a': 4.07...}, cached in ~/.cache/surfdiff/lattice.json
"""

from __future__ import annotations

from surfdiff_core.oracles.calculators import TRUST_MODEL_FILE, VASP_SLAB_INCAR, gpaw_parameters, kpts_from_cell
from surfdiff_core.oracles.errors import MissingExtraError, OracleError
from surfdiff_core.oracles.lattice import bulk_lattice_constant, default_cache_dir
from surfdiff_core.oracles.registry import (
    OracleSpec,
    available_oracles,
    canonical_settings,
    check_elements,
    get_calculator,
    get_oracle_spec,
    oracle_settings_hash,
    require_oracle,
    resolve_settings,
    supported_elements,
)

__all__ = [
    "TRUST_MODEL_FILE",
    "VASP_SLAB_INCAR",
    "MissingExtraError",
    "OracleError",
    "OracleSpec",
    "available_oracles",
    "bulk_lattice_constant",
    "canonical_settings",
    "check_elements",
    "default_cache_dir",
    "get_calculator",
    "get_oracle_spec",
    "gpaw_parameters",
    "kpts_from_cell",
    "oracle_settings_hash",
    "require_oracle",
    "resolve_settings",
    "supported_elements",
]
