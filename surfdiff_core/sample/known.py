"""Structures that condition sampling: the fixed atoms of inpainting and the seed of seeded exploration.

A source is an ASE-readable structure file or a store document id. It must be a slab of the target's substrate
(same substrate atoms in the same order and frame, same in-plane cell); its overlayer atoms are the atoms after
the substrate. Fixed atoms are placed in the target's overlayer slots of their element, in order, so a target
may hold more atoms than the source (regenerate the rest) but never fixed atoms it has no slot for. Every
problem is one line (ConfigError), raised before anything is sampled.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms

from surfdiff_core.composition import format_composition
from surfdiff_core.errors import ConfigError

if TYPE_CHECKING:
    from surfdiff_core.config import InpaintConfig
    from surfdiff_core.store import ResultsStore
    from surfdiff_core.system import SurfaceSystem

_DOC_ID = re.compile(r"^(rss|generated|relaxed|dft|single_point)-[0-9a-f]{20}$")
SUBSTRATE_TOL = 0.5  # Å: a relaxed top layer still matches its template; another slab or frame does not
BOX_TOL = 1e-3  # Å, as the documents' in_box flag


def is_doc_id(spec: str) -> bool:
    return bool(_DOC_ID.match(spec))


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def source_digest(spec: str) -> str:
    """What identifies a source's content in sample ids: a file's hash (a file edited in place gives new
    samples), or the document id itself (documents are not rewritten with other structures)."""
    p = Path(spec)
    if not is_doc_id(spec) and p.is_file():
        st = p.stat()
        return _file_digest(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return spec


def load_source(spec: str, store: ResultsStore | None, where: str) -> Atoms:
    """The structure of a file or a store document (one line naming `where` when neither works)."""
    if is_doc_id(spec):
        doc = store.get(spec) if store is not None else None
        if doc is None:
            raise ConfigError(f"{where}: no document {spec} in the store")
        return doc.to_atoms()
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"{where}: {spec} is neither a structure file nor a document id (e.g. relaxed-0123…)")
    from ase.io import read

    try:
        atoms = read(p)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise ConfigError(f"{where}: cannot read {spec}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(atoms, Atoms):
        raise ConfigError(f"{where}: {spec} holds no single structure")
    return atoms


def check_substrate(atoms: Atoms, system: SurfaceSystem, where: str) -> None:
    """Refuse a structure that is not a slab of the target's substrate, cell and frame."""
    tpl, n = system.template, system.n_substrate
    label = f"{system.element}({system.facet}) {system.cell}, {n} substrate atoms"
    if len(atoms) < n or atoms.get_chemical_symbols()[:n] != tpl.get_chemical_symbols():
        raise ConfigError(f"{where}: its substrate is not the target's ({label}): another substrate or cell")
    cell, ref = np.asarray(atoms.get_cell())[:2, :2], np.asarray(tpl.get_cell())[:2, :2]
    if not np.allclose(cell, ref, atol=1e-3):
        raise ConfigError(f"{where}: its in-plane cell {np.round(cell, 3).tolist()} is not the target's "
                          f"{np.round(ref, 3).tolist()} ({label})")
    d = atoms.positions[:n] - tpl.positions
    frac = np.linalg.solve(ref.T, d[:, :2].T).T
    d[:, :2] = (frac - np.round(frac)) @ ref
    worst = float(np.linalg.norm(d, axis=1).max(initial=0.0))
    if worst > SUBSTRATE_TOL:
        raise ConfigError(f"{where}: its substrate atoms lie up to {worst:.2f} Å from the target's ({label}): "
                          f"another slab or coordinate frame")


def _slots(overlayer: tuple[str, ...], symbols: list[str], where: str, composition: str) -> list[int]:
    """The target overlayer slot of each given atom: the next free slot of its element."""
    free: dict[str, list[int]] = {}
    for k, s in enumerate(overlayer):
        free.setdefault(s, []).append(k)
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    extra = {s: c for s, c in counts.items() if c > len(free.get(s, []))}
    if extra:
        raise ConfigError(f"{where}: the atoms {format_composition(counts)} are not in the target composition "
                          f"{composition}")
    return [free[s].pop(0) for s in symbols]


@dataclass(frozen=True)
class FixedAtoms:
    """Known overlayer atoms of one target: `positions` [n_overlayer, 3] (rows of free slots are zero),
    `mask` [n_overlayer] marks the fixed slots; `source_indices` are their overlayer indices in the source."""

    source: str
    positions: np.ndarray
    mask: np.ndarray
    source_indices: tuple[int, ...]

    def describe(self, system: SurfaceSystem) -> dict:
        """Provenance for the documents: what was fixed, as indices of the generated structure."""
        slots = np.flatnonzero(self.mask)
        return {"source": self.source, "fixed_indices": [int(system.n_substrate + k) for k in slots],
                "source_overlayer_indices": list(self.source_indices),
                "fixed": format_composition({s: int(sum(system.overlayer[k] == s for k in slots))
                                             for s in {system.overlayer[k] for k in slots}})}


def _wrap_outside(pos: np.ndarray, system: SurfaceSystem) -> np.ndarray:
    """Atoms outside the cell in-plane wrapped into it; the others keep their coordinates bit for bit."""
    lat = np.asarray(system.template.get_cell())[:2, :2]
    frac = np.linalg.solve(lat.T, pos[:, :2].T).T
    out = pos.copy()
    outside = ((frac < 0) | (frac >= 1)).any(axis=1)
    out[outside, :2] = (frac[outside] % 1.0) @ lat
    return out


def _in_box(pos: np.ndarray, system: SurfaceSystem, where: str) -> np.ndarray:
    lo, hi = system.z_box
    bad = (pos[:, 2] < lo - BOX_TOL) | (pos[:, 2] > hi + BOX_TOL)
    if bad.any():
        z = float(pos[bad, 2][0] - system.surface_z)
        raise ConfigError(f"{where}: an overlayer atom lies {z:.2f} Å above the surface, outside the confinement "
                          f"box [{lo - system.surface_z:.2f}, {hi - system.surface_z:.2f}] Å")
    out = pos.copy()
    out[:, 2] = np.clip(out[:, 2], lo, hi)
    return out


def resolve_fixed(icfg: InpaintConfig, system: SurfaceSystem, store: ResultsStore | None) -> FixedAtoms:
    """The fixed atoms that `sample.inpaint` selects from its source, placed in the target's slots."""
    where = f"sample.inpaint.source {icfg.source}"
    atoms = load_source(icfg.source, store, where)
    check_substrate(atoms, system, where)
    n = system.n_substrate
    symbols = atoms.get_chemical_symbols()[n:]
    if not symbols:
        raise ConfigError(f"{where}: it has no overlayer atoms to fix")
    keep = np.ones(len(symbols), bool)
    if icfg.elements is not None:
        keep &= np.isin(symbols, icfg.elements)
    if icfg.z_range is not None:
        z = atoms.positions[n:, 2] - system.surface_z
        keep &= (z >= icfg.z_range[0]) & (z <= icfg.z_range[1])
    if icfg.indices is not None:
        if max(icfg.indices) >= len(symbols):
            raise ConfigError(f"sample.inpaint.indices: the source has {len(symbols)} overlayer atoms "
                              f"(indices 0-{len(symbols) - 1}), not {max(icfg.indices) + 1}")
        keep &= np.isin(np.arange(len(symbols)), icfg.indices)
    chosen = np.flatnonzero(keep)
    if not len(chosen):
        raise ConfigError("sample.inpaint: the selection (elements, z_range, indices) fixes no atom of the source")
    slots = _slots(system.overlayer, [symbols[k] for k in chosen], "sample.inpaint", system.composition)
    if len(chosen) == len(system.overlayer):
        raise ConfigError("sample.inpaint: the selection fixes every overlayer atom of the target: nothing is left "
                          "to generate")
    positions = np.zeros((len(system.overlayer), 3))
    mask = np.zeros(len(system.overlayer), bool)
    positions[slots] = _in_box(_wrap_outside(atoms.positions[n + chosen], system), system, where)
    mask[slots] = True
    return FixedAtoms(source=icfg.source, positions=positions, mask=mask,
                      source_indices=tuple(int(k) for k in chosen))


def resolve_seed(spec: str, system: SurfaceSystem, store: ResultsStore | None) -> np.ndarray:
    """The overlayer positions [n_overlayer, 3] of the seed structure, in the target's slots (it must hold exactly
    the target's composition)."""
    where = f"sample.seed_structure {spec}"
    atoms = load_source(spec, store, where)
    check_substrate(atoms, system, where)
    symbols = atoms.get_chemical_symbols()[system.n_substrate:]
    if sorted(symbols) != sorted(system.overlayer):
        counts: dict[str, int] = {}
        for s in symbols:
            counts[s] = counts.get(s, 0) + 1
        raise ConfigError(f"{where}: its overlayer {format_composition(counts) if counts else '(none)'} is not the "
                          f"target composition {system.composition}")
    slots = _slots(system.overlayer, symbols, where, system.composition)
    positions = np.zeros((len(system.overlayer), 3))
    positions[slots] = atoms.positions[system.n_substrate:]
    return _in_box(_wrap_outside(positions, system), system, where)
