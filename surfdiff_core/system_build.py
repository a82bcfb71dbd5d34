"""Build the study's systems from its config: the oracle checked against the study (its settings, the substrate
and every composition's elements), the substrate's lattice constant resolved ('auto': the oracle's relaxed
bulk), and one SurfaceSystem per composition in a cell.
"""

from __future__ import annotations

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
    check_oracle_support(cfg, compositions)
    return {
        c: build_system(
            cfg.substrate, cfg.confinement, cell, c, lattice=lattice,
            min_distance_scale=cfg.rss.min_distance_scale,
        )
        for c in compositions
    }
