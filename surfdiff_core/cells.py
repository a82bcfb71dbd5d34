"""Surface cells as 2×2 integer matrices on the primitive surface vectors of a facet.

Rows of the matrix give the supercell vectors in terms of (a1, a2); for the hexagonal facets a1 and a2
are at 60° (ASE's non-orthogonal fcc111/hcp0001 cells). Names: 'p(n×m)' = [[n,0],[0,m]] on every facet;
on hexagonal facets 'c(2×8)' = [[2,0],[-1,4]] (8 surface atoms per layer, the paper's training cell) and
'(√3×√3)R30°' (alias 'sqrt3') = [[1,1],[-1,2]]; on fcc100 'c(2×2)' = [[1,1],[-1,1]]. Any other cell in
Wood's notation ('(2√2×√2)R45°', 'c(4×2)', '(√7×√7)R19.1°') is read by surfdiff_core.wood.
"""

from __future__ import annotations

import re

import numpy as np

from surfdiff_core.errors import ConfigError
from surfdiff_core.facets import FACETS, HEXAGONAL_FACETS
from surfdiff_core.wood import parse_wood, wood_matrix

_NAMED: dict[str, dict[str, list[list[int]]]] = {
    "c(2x8)": {f: [[2, 0], [-1, 4]] for f in HEXAGONAL_FACETS},
    "sqrt3": {f: [[1, 1], [-1, 2]] for f in HEXAGONAL_FACETS},
    "c(2x2)": {"fcc100": [[1, 1], [-1, 1]]},
}
_P_CELL = re.compile(r"^p\((\d+)x(\d+)\)$")
_MATRIX_LABEL = re.compile(r"^\[\[(-?\d+),(-?\d+)\],\[(-?\d+),(-?\d+)\]\]$")  # cell_label of a matrix
# Substrate atoms (cell area in primitive cells × layers) a system may have: beyond this, placing one random
# structure alone needs gigabytes (pair distances), so such a cell is refused when the config is read.
MAX_SUBSTRATE_ATOMS = 10_000


def canonical_cell_name(name: str) -> str:
    """One spelling per name: lower case, 'x' for '×', Wood's notation as `WoodCell.label` ('(2×1)' → 'p(2x1)',
    '(2√2 × √2)R45°' → '(2sqrt2xsqrt2)r45'), '(√3×√3)R30°' → 'sqrt3'."""
    s = name.strip().lower().replace("×", "x").replace("*", "x").replace(" ", "")
    if re.fullmatch(r"\d+x\d+", s):
        s = f"p({s})"
    wood = parse_wood(s)
    if wood is not None:
        s = wood.label
    return "sqrt3" if s == "(sqrt3xsqrt3)r30" else s


def cell_matrix(cell: str | list[list[int]], facet: str) -> np.ndarray:
    """Resolve a cell name, explicit matrix or a matrix's label ('[[3,0],[1,2]]') to a validated 2×2 integer
    matrix."""
    if isinstance(cell, str):
        key = canonical_cell_name(cell)
        m = _P_CELL.match(key)
        label = _MATRIX_LABEL.match(key)
        if m:
            matrix = [[int(m.group(1)), 0], [0, int(m.group(2))]]
        elif label:  # a matrix cell's label, as results and stored documents carry it
            a, b, c, d = map(int, label.groups())
            matrix = [[a, b], [c, d]]
        elif key in _NAMED and facet in _NAMED[key]:
            matrix = _NAMED[key][facet]
        elif (wood := parse_wood(key)) is not None:
            matrix = wood_matrix(wood, facet, cell)
        elif key in _NAMED:
            raise ConfigError(f"cell {cell!r} is not defined on facet {facet}; give a 2x2 matrix instead")
        else:
            raise ConfigError(f"unknown cell name {cell!r}: use p(nxm), Wood's notation ('(2sqrt2xsqrt2)R45', "
                              "'c(4x2)'), c(2x8), sqrt3 or a 2x2 integer matrix")
    else:
        matrix = cell
    try:
        arr = np.array(matrix, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cell matrix {matrix!r} is not a 2x2 integer matrix") from exc
    if arr.shape != (2, 2) or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ConfigError(f"cell matrix {matrix!r} is not a 2x2 integer matrix")
    det = round(float(np.linalg.det(arr)))
    if det == 0:
        raise ConfigError(f"cell matrix {matrix!r} is singular (determinant 0)")
    if det < 0:
        raise ConfigError(f"cell matrix {matrix!r} has a negative determinant (left-handed cell); swap its rows")
    return arr.astype(int)


def cell_label(cell: str | list[list[int]], facet: str) -> str:
    """A stable, human-readable label: the canonical name when one was given, else the matrix."""
    if isinstance(cell, str) and not _MATRIX_LABEL.match(canonical_cell_name(cell)):
        return canonical_cell_name(cell)
    m = cell_matrix(cell, facet)
    return f"[[{m[0, 0]},{m[0, 1]}],[{m[1, 0]},{m[1, 1]}]]"


def equivalent_labels(cell: str | list[list[int]], facet: str) -> list[str]:
    """Every label a document of this cell may carry on `facet`: a name and the matrices it stands for ('p(4x4)'
    and '[[4,0],[0,4]]'; 'c(2x8)' and '[[2,0],[-1,4]]'), or a matrix and the names that equal it there. The first
    is the cell's own label; empty where a name is not defined on `facet`."""
    try:
        matrix = cell_matrix(cell, facet).tolist()
    except ConfigError:
        return []  # a name not defined on this facet
    labels = [cell_label(cell, facet), cell_label(matrix, facet)]
    if matrix[0][1] == matrix[1][0] == 0:
        labels.append(f"p({matrix[0][0]}x{matrix[1][1]})")
    labels += [name for name, on in _NAMED.items() if on.get(facet) == matrix]
    return list(dict.fromkeys(labels))


def cell_criteria(cell: str | list[list[int]]) -> dict:
    """Store criteria for the documents of this cell, by name or by matrix: each facet's own labels (a matrix
    that is c(2x2) on fcc100 is another cell on fcc111; a name finds nothing on a facet without it), as one `cell`
    criterion where every facet agrees."""
    groups = {facet: labels for facet in FACETS if (labels := equivalent_labels(cell, facet))}
    distinct = {tuple(labels) for labels in groups.values()}
    if len(groups) == len(FACETS) and len(distinct) == 1:
        (labels,) = distinct
        return {"cell": labels[0] if len(labels) == 1 else {"$in": list(labels)}}
    return {"$or": [{"facet": facet, "cell": {"$in": labels}} for facet, labels in groups.items()]}


def file_slug(composition: str, cell: str) -> str:
    """A target as part of a file name: 'Ag6O3-p3x3', 'O2-3_0_1_2' for a matrix cell (no brackets, commas or
    parentheses, which shells and markdown links trip over)."""
    name = cell.replace("(", "").replace(")", "").replace(" ", "")
    return f"{composition}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}"


def check_slab_size(cell: str | list[list[int]], matrix: np.ndarray, layers: int) -> None:
    """One line when the slab of `cell` (its matrix) with `layers` layers has too many atoms to handle."""
    n = abs(round(float(np.linalg.det(matrix)))) * layers  # every facet: one atom per primitive cell and layer
    if n > MAX_SUBSTRATE_ATOMS:
        raise ConfigError(f"cell {cell!r} with {layers} substrate layers makes {n} substrate atoms; at most "
                          f"{MAX_SUBSTRATE_ATOMS} are supported (choose a smaller cell or fewer layers)")
