"""Export query results to extxyz (all structures in one file, energies and provenance in info) or CIF."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ase.io import write

from surfdiff_core.errors import ConfigError
from surfdiff_core.store.documents import StructureDoc

FORMATS = {".extxyz": "extxyz", ".xyz": "extxyz", ".cif": "cif"}


def export_docs(docs: Sequence[StructureDoc], path: str | Path) -> Path:
    """Write the structures; the file appears atomically (temp file + rename), never half-written."""
    out = Path(path)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot export to {out.name!r}: use a .extxyz, .xyz or .cif file name")
    images = []
    for d in docs:
        atoms = d.to_atoms()
        atoms.info = {k: v for k, v in atoms.info.items() if isinstance(v, str | int | float)}
        atoms.info.update(system_id=d.system_id, cell=d.cell)
        if fmt == "extxyz":
            atoms.pbc = [True, True, False]
        images.append(atoms)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=out.suffix)
    os.close(fd)
    try:
        write(tmp, images, format=fmt)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
