"""Build the study's systems from its config: the oracle checked against the study (its settings, the substrate
and every composition's elements), the substrate's lattice constant resolved ('auto': the oracle's relaxed
bulk), and one SurfaceSystem per composition in a cell.

Each system is built once per process (`study_system`), keyed by what fixes it: the substrate, confinement and
oracle sections (the oracle fixes an 'auto' lattice), rss.min_distance_scale, the cell and the composition. Every
caller gets its own copy (template Atoms and meta), so none can change a system under another.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterable
from typing import Any

from surfdiff_core.composition import parse_composition
from surfdiff_core.config import SurfdiffConfig
from surfdiff_core.system import SurfaceSystem, build_system


def check_oracle_support(cfg: SurfdiffConfig, compositions: Iterable[str] = (), *, method: str | None = None,
                         settings: dict[str, Any] | None = None) -> None:
    """Before anything runs: the energy model (the oracle, or `method` with `settings`) has valid settings and can
    treat the substrate and every element of `compositions` (one line naming what it cannot)."""
    from surfdiff_core.oracles import check_elements, resolve_settings

    name = method or cfg.oracle.name
    resolve_settings(name, cfg.oracle.settings if method is None else settings)
    check_elements(name, {"substrate.element": [cfg.substrate.element],
                          **{f"composition {c}": list(parse_composition(c)) for c in compositions}})


def resolve_lattice(cfg: SurfdiffConfig) -> dict[str, float] | None:
    """Relaxed bulk lattice constant of the oracle when lattice_constant is 'auto' (cached on disk)."""
    check_oracle_support(cfg)
    if cfg.substrate.lattice_constant != "auto":
        return None
    from surfdiff_core.oracles import bulk_lattice_constant, get_oracle_spec

    crystal = "hcp" if cfg.substrate.facet == "hcp0001" else "fcc"
    if not get_oracle_spec(cfg.oracle.name).in_process:  # VASP runs on HPC only: give lattice_constant there
        from surfdiff_core.errors import ConfigError

        raise ConfigError("lattice_constant 'auto' needs a local oracle; with oracle 'vasp' give a number")
    return bulk_lattice_constant(cfg.substrate.element, crystal, cfg.oracle.name, cfg.oracle.settings)


def systems_for(cfg: SurfdiffConfig, cell: Any, compositions: list[str], lattice: dict | None
                ) -> dict[str, SurfaceSystem]:
    """The system of each composition in `cell`; `lattice` is resolve_lattice(cfg), for those not built yet."""
    check_oracle_support(cfg, compositions)
    return {c: _memoised(cfg, cell, c, lattice) for c in compositions}


def study_system(cfg: SurfdiffConfig, cell: Any, composition: str) -> SurfaceSystem:
    """The system of `composition` in `cell`, its lattice resolved only when it is first built."""
    with _LOCK:
        system = _BUILT.get(_key(cfg, cell, composition))
    if system is None:  # the checks, lattice and build as ever
        return systems_for(cfg, cell, [composition], resolve_lattice(cfg))[composition]
    check_oracle_support(cfg, [composition])  # still every call: the oracle registry may change at run time
    return _copy(system)


# ---- one build per process ------------------------------------------------------------------------------------
_BUILT: dict[tuple, SurfaceSystem] = {}
_LOCK = threading.Lock()  # flows sample targets in threads: one build each, not one per thread
_MAX_BUILT = 512  # far above a sweep's targets; a long process of many studies drops its oldest


def _key(cfg: SurfdiffConfig, cell: Any, composition: str) -> tuple:
    return (cfg.section_hash("substrate", "confinement", "oracle"), cfg.rss.min_distance_scale, json.dumps(cell),
            composition)


def _memoised(cfg: SurfdiffConfig, cell: Any, composition: str, lattice: dict | None) -> SurfaceSystem:
    key = _key(cfg, cell, composition)
    with _LOCK:
        system = _BUILT.get(key)
        if system is None:
            system = build_system(cfg.substrate, cfg.confinement, cell, composition, lattice=lattice,
                                  min_distance_scale=cfg.rss.min_distance_scale)
            if len(_BUILT) >= _MAX_BUILT:
                _BUILT.pop(next(iter(_BUILT)))
            _BUILT[key] = system
    return _copy(system)


def _copy(system: SurfaceSystem) -> SurfaceSystem:
    """A copy that shares no mutable part with the memoised system (SurfaceSystem is frozen, its Atoms are not)."""
    return dataclasses.replace(system, template=system.template.copy(), meta=dict(system.meta))


def clear_systems() -> None:
    """Forget every built system (tests that change the lattice cache or the oracle registry between studies)."""
    with _LOCK:
        _BUILT.clear()
