"""Validity per target: how many structures were made, how many are usable, and why the others are not.

Reasons come from the documents (`valid`, `in_box`, `error`, as the sampler and the relaxers record them)
or are recomputed from the geometry (minimum interatomic distance, confinement box), so generated, RSS and
relaxed documents are counted alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms

from surfdiff_core.store.documents import StructureDoc

DEFAULT_MIN_DISTANCE = 1.0  # Å, the sampler's own threshold (surfdiff_core.diffusion.validity)
DEFAULT_BOX_TOL = 0.05  # Å, the relaxers' tolerance on the confinement box


@dataclass
class ValidityCounts:
    """Counts for one target (system and composition). A structure can fail several checks at once."""

    system_id: str
    composition: str
    total: int = 0
    valid: int = 0
    too_close: int = 0  # some pair with an overlayer atom closer than the minimum distance
    outside_box: int = 0  # some overlayer atom outside the confinement box
    failed: int = 0  # invalid for another recorded reason (non-finite positions, failed relaxation, ...)

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.total if self.total else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "valid_fraction": self.valid_fraction}


def min_overlayer_distance(atoms: Atoms, n_substrate: int) -> float:
    """Shortest distance between an overlayer atom and any other atom (in-plane periodic images included)."""
    if len(atoms) <= n_substrate:
        return float("inf")
    cell = np.asarray(atoms.cell)
    shifts = np.array([i * cell[0] + j * cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)])
    overlayer = atoms.positions[n_substrate:]
    images = (atoms.positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    dist = np.linalg.norm(overlayer[:, None, :] - images[None, :, :], axis=-1)
    own = n_substrate + np.arange(len(overlayer))
    dist[np.arange(len(overlayer)), 4 * len(atoms) + own] = np.inf  # shift index 4 is (0, 0): the atom itself
    return float(dist.min())


def atoms_outside_box(atoms: Atoms, n_substrate: int, z_box: Sequence[float], tol: float = DEFAULT_BOX_TOL) -> int:
    """Number of overlayer atoms whose height lies outside [z_box[0] - tol, z_box[1] + tol]."""
    z = atoms.positions[n_substrate:, 2]
    return int(np.sum((z < z_box[0] - tol) | (z > z_box[1] + tol)))


def doc_reasons(
    doc: StructureDoc,
    *,
    recompute: bool = False,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    box_tol: float = DEFAULT_BOX_TOL,
) -> set[str]:
    """Why `doc` is not usable: a subset of {'too_close', 'outside_box', 'failed'}; empty when valid.

    From the recorded fields by default; `recompute=True` checks the geometry instead (and keeps 'failed'
    for a recorded error that is neither of the geometric reasons).
    """
    reasons: set[str] = set()
    error = (doc.error or "").lower()
    if recompute:
        atoms = doc.to_atoms()
        if min_overlayer_distance(atoms, doc.n_substrate) < min_distance:
            reasons.add("too_close")
        if atoms_outside_box(atoms, doc.n_substrate, doc.z_box, box_tol):
            reasons.add("outside_box")
    else:
        if "closer than" in error:
            reasons.add("too_close")
        if "outside" in error or not doc.in_box:
            reasons.add("outside_box")
    geometric_error = "closer than" in error or "outside" in error
    if (doc.error and not geometric_error) or (not doc.valid and not reasons and not recompute):
        reasons.add("failed")
    return reasons


def validity_counts(
    docs: Sequence[StructureDoc],
    *,
    recompute: bool = False,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    box_tol: float = DEFAULT_BOX_TOL,
) -> dict[tuple[str, str], ValidityCounts]:
    """Counts per (system_id, composition), in first-seen order. See `doc_reasons` for the checks."""
    out: dict[tuple[str, str], ValidityCounts] = {}
    for doc in docs:
        key = (doc.system_id, doc.composition)
        counts = out.setdefault(key, ValidityCounts(*key))
        reasons = doc_reasons(doc, recompute=recompute, min_distance=min_distance, box_tol=box_tol)
        counts.total += 1
        counts.valid += not reasons
        counts.too_close += "too_close" in reasons
        counts.outside_box += "outside_box" in reasons
        counts.failed += "failed" in reasons
    return out
