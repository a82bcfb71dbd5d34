"""Sweep targets, expanded where the substrate's lattice is known: every cell × composition of `sample.sweep`
(planned by surfdiff_core.sweep at config load) built and checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surfdiff_core.cells import cell_label, cell_matrix
from surfdiff_core.composition import parse_composition
from surfdiff_core.config import ConfinementConfig, SampleTarget, SubstrateConfig
from surfdiff_core.errors import ConfigError
from surfdiff_core.sweep import CellSpec, SweepConfig, cell_key, plan_sweep
from surfdiff_core.system import SurfaceSystem, build_substrate, build_system


@dataclass
class SweepExpansion:
    targets: list[SampleTarget] = field(default_factory=list)
    planned: int = 0  # within the coverage and ratio limits (config load)
    areas: dict[str, float] = field(default_factory=dict)  # cell label -> surface area, Å²

    @property
    def dropped(self) -> int:
        return self.planned - len(self.targets)

    def summary(self) -> str:
        return (f"sample.sweep: {len(self.targets)} targets kept of {self.planned} "
                f"({self.dropped} outside atoms_per_area)")


def surface_area(substrate: SubstrateConfig, cell: CellSpec, lattice: dict[str, float] | None) -> float:
    """In-plane area (Å²) of the cell on the substrate: one substrate layer built, no overlayer."""
    if substrate.lattice_constant == "auto":
        if lattice is None:
            raise ConfigError("lattice_constant is 'auto' but no relaxed bulk lattice constant was given")
        a = lattice["a"]
    else:
        a = float(substrate.lattice_constant)
    slab = build_substrate(substrate.element, substrate.facet, cell_matrix(cell, substrate.facet), a=a, layers=1)
    cell_vectors = np.asarray(slab.get_cell())
    return float(np.linalg.norm(np.cross(cell_vectors[0], cell_vectors[1])))


def expand_sweep(sweep: SweepConfig, substrate: SubstrateConfig, confinement: ConfinementConfig, *,
                 lattice: dict[str, float] | None = None, min_distance_scale: float = 0.75) -> SweepExpansion:
    """Every target of the sweep, built and checked: targets outside atoms_per_area are dropped; one that
    cannot fit its confinement box is refused with one line naming it (ConfigError). `lattice` resolves
    lattice_constant 'auto' (surfdiff_core.system_build.resolve_lattice)."""
    plan = plan_sweep(sweep, substrate.facet)
    out = SweepExpansion(planned=len(plan))
    systems: dict[str, SurfaceSystem] = {}  # one slab per cell; each composition is checked against it
    for cell, comp in plan:
        label = cell_label(cell, substrate.facet)
        if label not in out.areas:
            out.areas[label] = surface_area(substrate, cell, lattice)
        density = sum(parse_composition(comp).values()) / out.areas[label]
        if sweep.atoms_per_area is not None and not sweep.atoms_per_area.holds(density):
            continue
        try:
            if label in systems:
                systems[label].with_composition(comp)
            else:
                systems[label] = build_system(substrate, confinement, cell, comp, lattice=lattice,
                                              min_distance_scale=min_distance_scale)
        except ConfigError as exc:  # the fit check names the composition and the cell; other checks do not
            where = "" if comp in str(exc) else f"{comp} in {label}: "
            raise ConfigError(f"sample.sweep: {where}{exc}") from None
        out.targets.append(SampleTarget(cell=cell, composition=comp))
    if not out.targets:
        raise ConfigError(f"sample.sweep: none of its {out.planned} targets is within atoms_per_area "
                          f"{sweep.atoms_per_area.model_dump(exclude_none=True)} atoms/Å²")  # type: ignore[union-attr]
    kept = {cell_label(t.cell, substrate.facet) for t in out.targets}
    if empty := [label for label in out.areas if label not in kept]:  # a cell the limit leaves empty: a mistake
        raise ConfigError(f"sample.sweep.cells: no composition fits cell {empty[0]!r} "
                          f"({out.areas[empty[0]]:.1f} Å²) within atoms_per_area "
                          f"{sweep.atoms_per_area.model_dump(exclude_none=True)} atoms/Å²: drop the cell or widen "  # type: ignore[union-attr]
                          f"the limit")
    return out


def unique_targets(targets: list[SampleTarget], facet: str) -> list[SampleTarget]:
    """Each (cell, composition) once, the first in order kept: a cell's name and its matrix are one cell, and
    Ag4O2 and O2Ag4 one composition."""
    seen: dict[tuple, SampleTarget] = {}
    for t in targets:
        seen.setdefault((cell_key(t.cell, facet), frozenset(parse_composition(t.composition).items())), t)
    return list(seen.values())
