"""Wood's notation for surface cells: '(2√2×√2)R45°', 'c(4×2)', '(√7×√7)R19.1°', '(2×1)'.

A cell (A×B)Rθ has the vectors b1 = A·R(θ)·a1 and b2 = B·R(θ)·a2 on the facet's primitive surface vectors; a
centred cell c(A×B)Rθ is the lattice of (b1, b2) with a point at (b1 + b2)/2. The matrix that gives (b1, b2) in
(a1, a2) must be integer, else the cell does not fit the facet and is refused. Centred cells are read on the
rectangular facets only (fcc100, fcc110): on hexagonal facets papers centre on different conventional cells.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from surfdiff_core.errors import ConfigError
from surfdiff_core.facets import primitive_vectors

_LENGTH = r"(\d*)(?:(?:√|sqrt)\(?(\d+)\)?)?"  # 2, √3, 2√2, sqrt(3), 2sqrt3
_WOOD = re.compile(rf"^([pc]?)\({_LENGTH}x{_LENGTH}\)(?:r(-?\d+(?:\.\d+)?)°?)?$")
# Rounded angles as papers print them ('R19.1°' for 19.107°): a cell vector may miss a lattice point by this much
# (in primitive-vector units) and still be read as that lattice point.
_TOLERANCE = 0.03
CENTRED_FACETS = ("fcc100", "fcc110")


@dataclass(frozen=True)
class WoodCell:
    centred: bool
    a: tuple[int, int]  # A = a[0]·√a[1]
    b: tuple[int, int]
    angle: float  # degrees, counter-clockwise

    @property
    def label(self) -> str:
        """The canonical spelling (ASCII, lower case, as labels in the store are): 'p(2x1)', 'c(4x2)',
        '(2sqrt2xsqrt2)r45', '(sqrt7xsqrt7)r19.1'."""
        size = f"({_length_text(self.a)}x{_length_text(self.b)})"
        plain = self.a[1] == self.b[1] == 1 and self.angle == 0
        prefix = "c" if self.centred else ("p" if plain else "")
        rotation = f"r{self.angle:g}" if self.angle else ""
        return f"{prefix}{size}{rotation}"


def _length_text(length: tuple[int, int]) -> str:
    k, root = length
    if root == 1:
        return str(k)
    return f"{'' if k == 1 else k}sqrt{root}"


def _length(factor: str, root: str | None) -> tuple[int, int] | None:
    if not factor and not root:
        return None
    k, n = int(factor) if factor else 1, int(root) if root else 1
    if k == 0 or n == 0:
        return None
    p = 2
    while p * p <= n:  # 2√8 → 4√2: one spelling per length
        while n % (p * p) == 0:
            k, n = k * p, n // (p * p)
        p += 1
    return k, n


def parse_wood(text: str) -> WoodCell | None:
    """The Wood cell a (canonicalised: lower case, 'x' for '×', no spaces) name spells, or None."""
    m = _WOOD.match(text)
    if not m:
        return None
    a, b = _length(m.group(2), m.group(3)), _length(m.group(4), m.group(5))
    if a is None or b is None:
        return None
    angle = float(m.group(6)) if m.group(6) else 0.0
    return WoodCell(centred=m.group(1) == "c", a=a, b=b, angle=angle)


def wood_matrix(cell: WoodCell, facet: str, name: str) -> list[list[int]]:
    """The 2×2 integer matrix of a Wood cell on `facet`; one line when it does not fit the facet's lattice."""
    if cell.centred and facet not in CENTRED_FACETS:
        raise ConfigError(f"cell {name!r} is not defined on facet {facet} (centred cells only on "
                          f"{' and '.join(CENTRED_FACETS)}); give a 2x2 matrix or a rotated cell instead")
    prim = primitive_vectors(facet)
    theta = math.radians(cell.angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = [ln[0] * math.sqrt(ln[1]) for ln in (cell.a, cell.b)]
    vectors = np.stack([scale[i] * rot @ prim[i] for i in range(2)])
    if cell.centred:
        vectors = np.stack([vectors[0], vectors.sum(axis=0) / 2])
    coefficients = vectors @ np.linalg.inv(prim)
    matrix = np.rint(coefficients)
    if np.abs(coefficients - matrix).max() > _TOLERANCE or round(float(np.linalg.det(matrix))) == 0:
        raise ConfigError(f"cell {name!r} does not fit the {facet} lattice (its vectors are not lattice vectors); "
                          "check the lengths and the angle, or give a 2x2 matrix")
    return matrix.astype(int).tolist()
