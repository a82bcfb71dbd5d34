"""The surface system every stage works on: a fixed substrate slab (masked), the overlayer atoms to place,
and the confinement box above the surface (AGOX's 'environment', without its inheritance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from ase import Atoms
from ase.build import make_supercell
from ase.data import atomic_numbers, covalent_radii

from surfdiff_core.cells import cell_label, cell_matrix, check_slab_size
from surfdiff_core.composition import composition_symbols, format_composition, parse_composition
from surfdiff_core.config import CellSpec, ConfinementConfig, SubstrateConfig
from surfdiff_core.errors import ConfigError
from surfdiff_core.facets import primitive_slab

# Random close packing of spheres: a composition denser than this cannot be placed at the minimum distances.
_MAX_PACKING = 0.64


def build_substrate(
    element: str,
    facet: str,
    matrix: np.ndarray,
    *,
    a: float,
    c: float | None = None,
    layers: int = 3,
    vacuum: float = 10.0,
) -> Atoms:
    """Substrate slab in the supercell `matrix` of the facet's primitive surface cell.

    Atoms are ordered bottom layer first; tags hold the layer index counted from the top (1 = top layer),
    as in ASE's builders. pbc is in-plane only.
    """
    prim = primitive_slab(element, facet, a=a, c=c, layers=layers, vacuum=vacuum)
    full = np.eye(3, dtype=int)
    full[:2, :2] = matrix
    slab = make_supercell(prim, full, wrap=True)
    slab.pbc = [True, True, False]
    order = np.lexsort((slab.positions[:, 1], slab.positions[:, 0], -slab.get_tags()))
    slab = slab[order]
    slab.wrap()
    return slab


def min_distance_matrix(symbols: list[str] | np.ndarray, scale: float) -> np.ndarray:
    """Element-pair minimum distances: scale × (r_cov(A) + r_cov(B))."""
    numbers = np.array([atomic_numbers[s] if isinstance(s, str) else int(s) for s in symbols])
    r = covalent_radii[numbers]
    return scale * (r[:, None] + r[None, :])


# Å: a relaxed overlayer atom this far outside the box still counts as inside (relaxations by any route)
RELAXED_BOX_TOLERANCE = 0.05


def in_confinement_box(positions: np.ndarray, n_substrate: int, z_box: tuple[float, float] | list[float],
                       tol: float) -> np.ndarray:
    """Per overlayer atom (the atoms after the substrate's): does its z lie inside the confinement box?"""
    z = np.asarray(positions)[n_substrate:, 2]
    return (z >= z_box[0] - tol) & (z <= z_box[1] + tol)


@dataclass(frozen=True)
class SurfaceSystem:
    """Template slab (masked substrate) + atoms to place + confinement box (absolute z range, Å)."""

    template: Atoms
    overlayer: tuple[str, ...]
    z_box: tuple[float, float]
    fixed_layers: int
    element: str
    facet: str
    cell: str
    matrix: tuple[tuple[int, int], tuple[int, int]]
    min_distance_scale: float = 0.75
    meta: dict = field(default_factory=dict, compare=False)

    # ---- identity ----------------------------------------------------------------------------------------
    @property
    def composition(self) -> str:
        counts: dict[str, int] = {}
        for s in self.overlayer:
            counts[s] = counts.get(s, 0) + 1
        return format_composition(counts)

    @property
    def system_id(self) -> str:
        """Substrate/facet/cell: the key that groups structures that can be compared directly."""
        return f"{self.element}({self.facet})-{self.cell}-L{self.n_layers}"

    @property
    def n_layers(self) -> int:
        return int(self.template.get_tags().max())

    @property
    def n_substrate(self) -> int:
        return len(self.template)

    @property
    def n_atoms(self) -> int:
        return self.n_substrate + len(self.overlayer)

    # ---- masks -------------------------------------------------------------------------------------------
    @cached_property
    def movable(self) -> np.ndarray:
        """True for overlayer atoms (diffused), False for the masked substrate."""
        return np.r_[np.zeros(self.n_substrate, bool), np.ones(len(self.overlayer), bool)]

    @cached_property
    def fixed_indices(self) -> np.ndarray:
        """Bottom substrate layers held fixed in relaxations (tags count layers from the top)."""
        tags = self.template.get_tags()
        return np.flatnonzero(tags > self.n_layers - self.fixed_layers)

    @property
    def surface_z(self) -> float:
        tags = self.template.get_tags()
        return float(self.template.positions[tags == 1, 2].max())

    # ---- geometry ----------------------------------------------------------------------------------------
    def compose(self, overlayer_positions: np.ndarray) -> Atoms:
        """Template + overlayer atoms at the given positions (in-plane wrapped); movable mask attached."""
        pos = np.asarray(overlayer_positions, float).reshape(len(self.overlayer), 3)
        atoms = self.template.copy()
        atoms += Atoms(symbols=list(self.overlayer), positions=pos)
        atoms.set_tags(np.r_[self.template.get_tags(), np.zeros(len(self.overlayer), int)])
        atoms.pbc = [True, True, False]
        atoms.wrap()
        atoms.set_array("movable", self.movable.copy())
        return atoms

    def inside_box(self, atoms: Atoms, tol: float = 1e-6) -> np.ndarray:
        """Per overlayer atom: does it lie inside the confinement box?"""
        return in_confinement_box(atoms.positions, self.n_substrate, self.z_box, tol)

    def random_overlayer(self, rng: np.random.Generator, max_attempts: int = 2000) -> np.ndarray:
        """Random sequential placement in the box with element-pair minimum distances under in-plane PBC."""
        cell = np.asarray(self.template.get_cell())
        symbols = list(self.template.get_chemical_symbols()) + list(self.overlayer)
        dmin = min_distance_matrix(symbols, self.min_distance_scale)
        placed = list(self.template.positions)
        n_sub = self.n_substrate
        shifts = np.array([i * cell[0] + j * cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)])
        for k in range(len(self.overlayer)):
            idx = n_sub + k
            others = np.asarray(placed)
            for _ in range(max_attempts):
                f = rng.random(2)
                z = rng.uniform(*self.z_box)
                p = f[0] * cell[0] + f[1] * cell[1]
                p[2] = z
                d = np.linalg.norm(others[None, :, :] + shifts[:, None, :] - p[None, None, :], axis=-1).min(0)
                if np.all(d >= dmin[idx, : len(others)]):
                    placed.append(p)
                    break
            else:
                raise ConfigError(
                    f"could not place {self.composition} in the {self.cell} confinement box "
                    f"[{self.z_box[0]:.2f}, {self.z_box[1]:.2f}] Å at the minimum distances after "
                    f"{max_attempts} attempts: enlarge the box or the cell, or reduce the composition"
                )
        return np.asarray(placed[n_sub:])

    def random_structure(self, rng: np.random.Generator) -> Atoms:
        return self.compose(self.random_overlayer(rng))

    def with_composition(self, composition: str) -> SurfaceSystem:
        symbols = tuple(composition_symbols(parse_composition(composition)))
        new = SurfaceSystem(
            template=self.template, overlayer=symbols, z_box=self.z_box, fixed_layers=self.fixed_layers,
            element=self.element, facet=self.facet, cell=self.cell, matrix=self.matrix,
            min_distance_scale=self.min_distance_scale, meta=self.meta,
        )
        check_fits(new)
        return new

    def describe(self) -> dict:
        return {
            "system_id": self.system_id, "element": self.element, "facet": self.facet, "cell": self.cell,
            "matrix": [list(r) for r in self.matrix], "composition": self.composition,
            "n_substrate": self.n_substrate, "z_box": list(self.z_box), "fixed_layers": self.fixed_layers,
        }


def check_fits(system: SurfaceSystem) -> None:
    """Reject compositions that cannot be packed into the box at the minimum distances (before any work)."""
    cell = np.asarray(system.template.get_cell())
    area = float(np.linalg.norm(np.cross(cell[0], cell[1])))
    numbers = [atomic_numbers[s] for s in system.overlayer]
    radii = 0.5 * system.min_distance_scale * 2 * covalent_radii[numbers]
    height = system.z_box[1] - system.z_box[0]
    # Spheres centred in the box may poke out by their radius on either side.
    volume = area * (height + 2 * float(radii.max(initial=0.0)))
    packed = float(np.sum(4.0 / 3.0 * np.pi * radii**3))
    if packed > _MAX_PACKING * volume:
        raise ConfigError(
            f"composition {system.composition} cannot fit into the {system.cell} confinement box "
            f"({area:.1f} Å² × {height:.2f} Å) at the minimum distances: packing {packed / volume:.2f} > "
            f"{_MAX_PACKING}"
        )


def build_system(
    substrate: SubstrateConfig,
    confinement: ConfinementConfig,
    cell: CellSpec,
    composition: str,
    *,
    lattice: dict[str, float] | None = None,
    min_distance_scale: float = 0.75,
) -> SurfaceSystem:
    """The SurfaceSystem for one (cell, composition). `lattice` resolves lattice_constant='auto'."""
    matrix = cell_matrix(cell, substrate.facet)
    check_slab_size(cell, matrix, substrate.layers)  # a cell from the command line: bounded before any work
    if substrate.lattice_constant == "auto":
        if lattice is None:
            raise ConfigError("lattice_constant is 'auto' but no relaxed bulk lattice constant was given")
        a, c = lattice["a"], lattice.get("c")
    else:
        a = float(substrate.lattice_constant)
        c = a * substrate.c_over_a if substrate.c_over_a else None
    template = build_substrate(
        substrate.element, substrate.facet, matrix, a=a, c=c, layers=substrate.layers, vacuum=substrate.vacuum
    )
    tags = template.get_tags()
    top = float(template.positions[tags == 1, 2].max())
    z_box = (top + confinement.z_min, top + confinement.z_max)
    if z_box[1] > template.cell[2, 2]:
        raise ConfigError(
            f"confinement box top ({confinement.z_max} Å above the surface) lies outside the cell "
            f"(only {template.cell[2, 2] - top:.2f} Å above the surface): increase substrate.vacuum"
        )
    symbols = tuple(composition_symbols(parse_composition(composition)))
    system = SurfaceSystem(
        template=template, overlayer=symbols, z_box=z_box, fixed_layers=substrate.fixed_layers,
        element=substrate.element, facet=substrate.facet, cell=cell_label(cell, substrate.facet),
        matrix=tuple(tuple(int(x) for x in row) for row in matrix), min_distance_scale=min_distance_scale,
        meta={"lattice_a": a, "lattice_c": c},
    )
    check_fits(system)
    return system
