"""The facets a substrate may have and the primitive slab of each: ASE's builders, the cells every cell matrix
and Wood name refers to (non-orthogonal on the hexagonal facets: a1 and a2 at 60°)."""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from surfdiff_core.errors import ConfigError

if TYPE_CHECKING:
    from ase import Atoms

FACETS = ("fcc111", "fcc100", "fcc110", "hcp0001")
HEXAGONAL_FACETS = ("fcc111", "hcp0001")


def primitive_slab(element: str, facet: str, *, a: float, c: float | None = None, layers: int = 1,
                   vacuum: float | None = None) -> Atoms:
    """One primitive surface cell of `facet`, `layers` deep (hcp0001: ideal c/a unless `c` is given)."""
    from ase import build  # not at import: config loading reads the facet names only (ase.build pulls in scipy)

    if facet not in FACETS:
        raise ConfigError(f"unknown facet {facet!r}")
    kwargs: dict = {"a": a, "vacuum": vacuum}
    if facet == "hcp0001":
        kwargs["c"] = c if c is not None else a * math.sqrt(8 / 3)
    if facet in HEXAGONAL_FACETS:
        kwargs["orthogonal"] = False
    return getattr(build, facet)(element, size=(1, 1, layers), **kwargs)


@cache
def primitive_vectors(facet: str) -> np.ndarray:
    """The in-plane primitive vectors (rows) of `facet` for a unit lattice constant."""
    return np.array(primitive_slab("Cu", facet, a=1.0).cell[:2, :2])
