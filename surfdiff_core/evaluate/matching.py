"""Uniqueness, novelty and de-duplication of slab structures with the substrate as the frame of reference.

Two structures of one system are "the same" when an isometry of the periodic slab (a lattice-preserving
operation plus a translation) maps every atom of one onto an atom of the same element of the other, each
within `site_tol` Å. The whole slab takes part, substrate included, so only the operations that map the
substrate onto itself survive: a translation by a substrate lattice vector and the surface point-group
operations (C3v rotations/mirrors on fcc(111)) count as the same structure, while the same overlayer in
another registry (fcc hollow → bridge, say) does not. pymatgen's StructureMatcher does the search
(`primitive_cell=False, scale=False, attempt_supercell=False`); the slab is rebuilt with an orthogonal c
axis and a wide vacuum so operations that flip the slab (the overlayer ends up under the slab) never fit.

Two pre-filters keep StructureMatcher (~30 ms a call) to the pairs that can match; both are conservative,
so they never change a result (the tests compare with brute force):
1. fingerprints (vectorised over all candidates): if two slabs match with every atom moved by at most δ,
   every interatomic distance changes by at most 2δ and order statistics are 1-Lipschitz in the max norm,
   so the sorted neighbour-distance fingerprints differ by at most 2δ;
2. a numpy registry test (~0.3 ms): pinning one atom of the rarest element fixes the translation up to δ,
   so under some lattice operation every atom must lie within 2δ of an atom of its element.
An optional energy window (`energy_tol`) is the one heuristic filter; it makes thousands of relaxed
structures group in seconds. Without it, n mutually distinct structures cost ~n²/2 registry tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from pymatgen.core import Lattice, Structure
from pymatgen.core.structure_matcher import StructureMatcher

from surfdiff_core.evaluate.screening import ANGLE_TOL, LTOL, could_match, slab_fingerprint
from surfdiff_core.store.documents import StructureDoc

DEFAULT_SITE_TOL = 0.6  # Å: below the 1.4–1.7 Å between neighbouring adsorption sites on close-packed facets
DEFAULT_VACUUM = 20.0  # Å of vacuum in the rebuilt cell: far more than any site tolerance


# ---- single structures -------------------------------------------------------------------------------------
def slab_structure(atoms: Atoms, vacuum: float = DEFAULT_VACUUM) -> Structure:
    """The slab as a pymatgen Structure: in-plane cell kept, c orthogonal with `vacuum` Å above the atoms."""
    cell = np.asarray(atoms.cell)
    if np.abs(cell[:2, 2]).max() > 1e-6:
        raise ValueError("the slab's in-plane cell vectors must lie in the xy plane")
    pos = atoms.positions.copy()
    z_lo, z_hi = pos[:, 2].min(), pos[:, 2].max()
    pos[:, 2] += vacuum / 2 - z_lo
    lattice = Lattice([cell[0], cell[1], [0.0, 0.0, z_hi - z_lo + vacuum]])
    return Structure(lattice, atoms.get_chemical_symbols(), pos, coords_are_cartesian=True, to_unit_cell=True)


def _matcher_for(structure: Structure, site_tol: float) -> StructureMatcher:
    # StructureMatcher compares the largest displacement to stol × (V/N)^(1/3): convert site_tol from Å.
    length_scale = (structure.volume / len(structure)) ** (1 / 3)
    return StructureMatcher(
        primitive_cell=False, scale=False, attempt_supercell=False, stol=site_tol / length_scale,
        ltol=LTOL, angle_tol=ANGLE_TOL,
    )


def slabs_match(a: Atoms, b: Atoms, *, site_tol: float = DEFAULT_SITE_TOL) -> bool:
    """True when an isometry of the periodic slab moves every atom of `b` onto `a` within `site_tol` Å."""
    if len(a) != len(b) or sorted(a.get_chemical_symbols()) != sorted(b.get_chemical_symbols()):
        return False
    sa, sb = slab_structure(a), slab_structure(b)
    return bool(_matcher_for(sa, site_tol).fit(sa, sb, skip_structure_reduction=True))


# ---- collections -------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """What the comparisons of one structure need, computed once."""

    key: tuple
    energy: float | None
    fingerprint: np.ndarray
    structure: Structure
    numbers: np.ndarray = field(init=False)
    frac: np.ndarray = field(init=False)
    payload: object = None

    def __post_init__(self) -> None:
        self.numbers = np.array([site.specie.Z for site in self.structure])
        self.frac = self.structure.frac_coords


def _prepare(atoms: Atoms, key: tuple, energy: float | None, payload: object) -> _Prepared:
    return _Prepared(key, energy, slab_fingerprint(atoms), slab_structure(atoms), payload=payload)


def _doc_key(doc: StructureDoc) -> tuple:
    return (doc.system_id, doc.composition)


def _energy_key(doc: StructureDoc) -> float:
    return doc.energy if doc.energy is not None else np.inf


class _Pool:
    """Structures to match against, bucketed by key, with the fingerprint (and optional energy) pre-filter
    in front of StructureMatcher. `matcher_calls` counts the expensive comparisons.
    """

    def __init__(self, site_tol: float, energy_tol: float | None, prefilter: bool) -> None:
        self.site_tol, self.energy_tol, self.prefilter = site_tol, energy_tol, prefilter
        self.matcher_calls = 0
        self._items: dict[tuple, list[tuple[int, _Prepared]]] = {}
        self._prints: dict[tuple, list[np.ndarray]] = {}

    def add(self, index: int, item: _Prepared) -> None:
        self._items.setdefault(item.key, []).append((index, item))
        self._prints.setdefault(item.key, []).append(item.fingerprint)

    def candidates(self, item: _Prepared) -> list[tuple[int, _Prepared]]:
        """Members that may match `item`: same key, fingerprints within 2·site_tol, energies within energy_tol."""
        members = self._items.get(item.key, [])
        if not members:
            return []
        keep = np.ones(len(members), bool)
        if self.prefilter:
            prints = self._prints[item.key]
            if all(len(p) == len(item.fingerprint) for p in prints):
                gap = np.abs(np.stack(prints) - item.fingerprint).max(axis=1)
                keep &= gap <= 2 * self.site_tol + 1e-6
        if self.energy_tol is not None and item.energy is not None:
            energies = np.array([np.nan if m.energy is None else m.energy for _, m in members])
            keep &= ~(np.abs(energies - item.energy) > self.energy_tol)  # NaN (no energy) stays a candidate
        return [m for m, k in zip(members, keep, strict=True) if k]

    def first_match(self, item: _Prepared) -> int | None:
        """Index of the first pooled structure (in insertion order) that matches `item`, else None."""
        for index, member in self.candidates(item):
            screened = could_match(member.structure, member.numbers, item.frac, item.numbers, self.site_tol)
            if self.prefilter and not screened:
                continue
            self.matcher_calls += 1
            matcher = _matcher_for(member.structure, self.site_tol)
            if matcher.fit(member.structure, item.structure, skip_structure_reduction=True):
                return index
        return None


def _prepare_docs(docs: Sequence[StructureDoc]) -> list[_Prepared]:
    return [_prepare(d.to_atoms(), _doc_key(d), d.energy, d) for d in docs]


def unique_groups(
    docs: Sequence[StructureDoc],
    *,
    site_tol: float = DEFAULT_SITE_TOL,
    energy_tol: float | None = None,
    prefilter: bool = True,
    on_progress: Callable[[int], None] | None = None,
    stats: dict | None = None,
) -> list[list[StructureDoc]]:
    """Group equivalent structures; groups and their members are ordered by energy (lowest first).

    Only documents with the same `system_id` and slab formula are compared. Greedy, like pymatgen's
    group_structures: each structure (lowest energy first) joins the first group whose representative (its
    lowest-energy member) it matches, else starts a new group. `energy_tol` (eV) additionally treats
    structures whose energies differ by more as distinct: a heuristic, use it only for relaxed energies of
    one energy model. `prefilter=False` sends every same-key pair to StructureMatcher (same result, slower).
    `stats`, if given, receives 'matcher_calls' (StructureMatcher comparisons made).
    """
    ordered = sorted(docs, key=_energy_key)
    representatives = _Pool(site_tol, energy_tol, prefilter)
    groups: list[list[StructureDoc]] = []
    for n, item in enumerate(_prepare_docs(ordered)):
        k = representatives.first_match(item)
        if k is None:
            representatives.add(len(groups), item)
            groups.append([item.payload])  # type: ignore[list-item]
        else:
            groups[k].append(item.payload)  # type: ignore[arg-type]
        if on_progress is not None:
            on_progress(n + 1)
    if stats is not None:
        stats["matcher_calls"] = representatives.matcher_calls
    return groups


def deduplicate(docs: Sequence[StructureDoc], k: int | None = None, **match_kwargs) -> list[StructureDoc]:
    """The lowest-energy representative of each distinct structure, lowest energy first; the first `k` if given.

    Use it before the expensive step: the top-K sent to the oracle or DFT are then K distinct structures.
    """
    if k is None:
        return [g[0] for g in unique_groups(docs, **match_kwargs)]
    # Groups form in energy order, so the first k representatives are final once k groups exist: stop there
    # (the top-K of thousands of samples costs K·n comparisons, not n²).
    ordered = sorted(docs, key=_energy_key)
    pool = _Pool(match_kwargs.get("site_tol", DEFAULT_SITE_TOL), match_kwargs.get("energy_tol"),
                 match_kwargs.get("prefilter", True))
    reps: list[StructureDoc] = []
    for item in (_prepare(d.to_atoms(), _doc_key(d), d.energy, d) for d in ordered):
        if len(reps) == k:
            break
        if pool.first_match(item) is None:
            pool.add(len(reps), item)
            reps.append(item.payload)  # type: ignore[arg-type]
    return reps


def uniqueness(docs: Sequence[StructureDoc], **match_kwargs) -> float:
    """Distinct structures / structures (1.0: all distinct); NaN for an empty list."""
    if not docs:
        return float("nan")
    return len(unique_groups(docs, **match_kwargs)) / len(docs)


def novel_mask(
    docs: Sequence[StructureDoc],
    reference_docs: Sequence[StructureDoc],
    *,
    site_tol: float = DEFAULT_SITE_TOL,
    energy_tol: float | None = None,
    prefilter: bool = True,
) -> list[bool]:
    """Per document: True when it matches no reference document of the same system and slab formula."""
    keys = {_doc_key(d) for d in docs}
    references = _Pool(site_tol, energy_tol, prefilter)
    for k, ref in enumerate(_prepare_docs([r for r in reference_docs if _doc_key(r) in keys])):
        references.add(k, ref)
    return [references.first_match(item) is None for item in _prepare_docs(docs)]


def novelty(docs: Sequence[StructureDoc], reference_docs: Sequence[StructureDoc], **match_kwargs) -> float:
    """Fraction of `docs` that match no structure of `reference_docs` (e.g. the training set); NaN if empty.

    Matching needs the same cell, so each document is compared only with the references of its own
    `system_id` (substrate, facet, cell, layers) and slab formula. A training set in another cell (c(2×8)
    training, p(3×3) target) has no comparable structures: every sample then counts as novel, which says
    nothing about memorisation of motifs. Report the number of comparable references beside it
    (`comparable_references`).
    """
    if not docs:
        return float("nan")
    mask = novel_mask(docs, reference_docs, **match_kwargs)
    return float(np.mean(mask))


def comparable_references(docs: Sequence[StructureDoc], reference_docs: Sequence[StructureDoc]) -> int:
    """How many reference documents share a system and slab formula with some document of `docs`."""
    keys = {_doc_key(d) for d in docs}
    return sum(_doc_key(r) in keys for r in reference_docs)


def find_reference(
    docs_sorted: Sequence[StructureDoc],
    reference_atoms: Atoms,
    *,
    site_tol: float = DEFAULT_SITE_TOL,
    prefilter: bool = True,
) -> int | None:
    """1-based rank of the first document (in the given order) that matches the reference slab, else None.

    `reference_atoms` is the whole slab (substrate + overlayer) in the documents' cell, e.g. read from a
    known global minimum. Only documents with the same slab formula are compared.
    """
    formula = reference_atoms.get_chemical_formula()
    pool = _Pool(site_tol, None, prefilter)
    pool.add(0, _prepare(reference_atoms, (formula,), None, None))
    for rank, doc in enumerate(docs_sorted, start=1):
        atoms = doc.to_atoms()
        if atoms.get_chemical_formula() == formula and pool.first_match(_prepare(atoms, (formula,), None, doc)) == 0:
            return rank
    return None
