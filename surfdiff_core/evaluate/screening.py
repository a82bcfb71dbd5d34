"""Conservative pre-filters for slab matching: each rules out only pairs StructureMatcher could not match.

See surfdiff_core.evaluate.matching for how they are used and why they are sound.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from pymatgen.core import Structure

N_NEIGHBOURS = 4  # per atom and element: nearest-neighbour distances kept in the fingerprint
LTOL, ANGLE_TOL = 0.05, 2.0  # same cell: tight, so that no shear of the long vacuum axis passes for a symmetry


def slab_fingerprint(atoms: Atoms, n_neighbours: int = N_NEIGHBOURS) -> np.ndarray:
    """Distances to the nearest `n_neighbours` atoms of each element, per atom (in-plane periodic images),
    sorted over the atoms of each element: invariant under any isometry and permutation of equal atoms.
    """
    cell = np.asarray(atoms.cell)
    symbols = np.array(atoms.get_chemical_symbols())
    elements = sorted(set(symbols))
    shifts = np.array([i * cell[0] + j * cell[1] for i in (-2, -1, 0, 1, 2) for j in (-2, -1, 0, 1, 2)])
    pos = atoms.positions
    images = (pos[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    image_symbols = np.tile(symbols, len(shifts))
    dist = np.linalg.norm(pos[:, None, :] - images[None, :, :], axis=-1)
    dist[dist < 1e-8] = np.inf  # an atom is not its own neighbour
    parts = []
    for centre in elements:
        rows = dist[symbols == centre]
        for neighbour in elements:
            nearest = np.sort(rows[:, image_symbols == neighbour], axis=1)[:, :n_neighbours]
            parts.append(np.sort(nearest, axis=0).ravel())  # column-wise sort: order of atoms drops out
    return np.concatenate(parts)


_OPS_CACHE: dict[bytes, np.ndarray] = {}


def _lattice_operations(structure: Structure) -> np.ndarray:
    """The fractional-coordinate operations StructureMatcher tries: inv(S) for every basis S·L of the lattice
    with the lengths and angles of L (the lattice's point group, as integer matrices).
    """
    lattice = structure.lattice
    key = np.round(lattice.matrix, 6).tobytes()
    if key not in _OPS_CACHE:
        maps = lattice.find_all_mappings(lattice, ltol=LTOL, atol=ANGLE_TOL, skip_rotation_matrix=True)
        _OPS_CACHE[key] = np.array([np.round(np.linalg.inv(scale)) for _, _, scale in maps])
    return _OPS_CACHE[key]


def could_match(
    a: Structure, a_numbers: np.ndarray, b_frac: np.ndarray, b_numbers: np.ndarray, site_tol: float
) -> bool:
    """Necessary condition for StructureMatcher to match slab `a` with slab `b` (fractional coordinates in
    the same lattice) within `site_tol` Å, in plain numpy.

    A match is an operation W, a translation t and a pairing with every displacement <= δ. Pinning one atom
    of the rarest element onto each same-element atom of `b` fixes t up to δ, so every atom then lies within
    2δ of a same-element atom: test that for all W and pins (the rarest element first, as a quick reject).
    """
    lattice = a.lattice.matrix
    heights = a.volume / np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]), axis=1)
    limit = 2 * site_tol + 1e-6
    if limit >= heights.min() / 2:  # rounding no longer gives the nearest image: cannot rule anything out
        return True
    elements, counts = np.unique(a_numbers, return_counts=True)
    rare = elements[np.argmin(counts)]
    anchor = int(np.flatnonzero(a_numbers == rare)[0])
    pins = b_frac[b_numbers == rare]

    def near(moved: np.ndarray, target: np.ndarray) -> np.ndarray:
        """For points (..., n, 3): is some target point (m, 3) within the limit (nearest image)? -> (..., n)"""
        diff = moved[..., :, None, :] - target
        diff -= np.round(diff)
        return (np.einsum("...i,ij->...j", diff, lattice) ** 2).sum(-1).min(-1) <= limit**2

    moved = np.einsum("ni,kij->knj", a.frac_coords, _lattice_operations(a))  # every operation at once
    shifted = moved[:, None, :, :] + (pins[None, :, :] - moved[:, anchor][:, None, :])[:, :, None, :]
    shifted = shifted.reshape(-1, *a.frac_coords.shape)  # one copy per (operation, pin)
    alive = near(shifted[:, a_numbers == rare], pins).all(axis=1)  # quick reject on the rarest element
    for z in elements:
        if z != rare and alive.any():
            alive[alive] = near(shifted[alive][:, a_numbers == z], b_frac[b_numbers == z]).all(axis=1)
    return bool(alive.any())
