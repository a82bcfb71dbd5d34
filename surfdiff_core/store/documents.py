"""Document schema for every structure the project makes (rss, generated, relaxed, dft).

Ids are deterministic functions of what produced a structure, so a retried or resumed write replaces
the same document instead of adding a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

# single_point: an oracle energy+force call on a sample (an active-learning label for the MLFF, not a minimum)
Source = Literal["rss", "generated", "relaxed", "dft", "single_point"]
SOURCES: tuple[str, ...] = ("rss", "generated", "relaxed", "dft", "single_point")


def make_doc_id(source: str, *parts: Any) -> str:
    """Deterministic id: source prefix + hash of the parts that identify how the structure was made."""
    digest = hashlib.sha1(json.dumps([source, *parts], sort_keys=True, default=str).encode()).hexdigest()
    return f"{source}-{digest[:20]}"


def now() -> datetime:
    return datetime.now(UTC)


class Frame(BaseModel):
    """One relaxation frame: MLFF training data."""

    model_config = ConfigDict(extra="forbid")
    positions: list[list[float]]
    energy: float
    forces: list[list[float]]


class StructureDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_id: str
    source: Source
    study: str | None = None  # the config name of the study that made it: every selection is scoped to one
    energy_model: str | None = None  # what computed `energy` (energy_model_key; 'mlff:<model_id>' for samples)
    structure: dict  # pymatgen Structure.as_dict()
    composition: str  # overlayer composition, e.g. 'Ag6O3'
    formula: str  # full slab formula
    system_id: str  # substrate/facet/cell/layers
    element: str
    facet: str
    cell: str
    n_substrate: int
    movable: list[bool]  # False = masked substrate atom
    fixed: list[int] = Field(default_factory=list)  # indices fixed in relaxations
    z_box: list[float]
    in_box: bool = True  # every overlayer atom inside the confinement box (False: kept out of training)
    valid: bool = True
    energy: float | None = None
    forces: list[list[float]] | None = None
    fmax: float | None = None
    steps: int | None = None
    converged: bool | None = None
    wall_time: float | None = None
    oracle: str | None = None
    oracle_settings: dict = Field(default_factory=dict)
    initial_structure: dict | None = None
    trajectory: list[Frame] = Field(default_factory=list)
    parent_id: str | None = None
    model_id: str | None = None
    config_hash: str | None = None
    run_id: str | None = None
    seed: int | None = None
    error: str | None = None
    meta: dict = Field(default_factory=dict)  # sampler / relaxation provenance
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    # ---- conversions -------------------------------------------------------------------------------------
    def to_structure(self) -> Structure:
        return Structure.from_dict(self.structure)

    def to_atoms(self) -> Atoms:
        atoms = AseAtomsAdaptor.get_atoms(self.to_structure())
        atoms.pbc = [True, True, False]
        atoms.set_array("movable", np.asarray(self.movable, bool))
        if self.energy is not None:
            atoms.info["energy"] = self.energy
        atoms.info.update({"doc_id": self.doc_id, "source": self.source, "composition": self.composition})
        return atoms

    def summary(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id, "source": self.source, "study": self.study, "system_id": self.system_id,
            "energy_model": self.energy_model, "cell": self.cell,
            "composition": self.composition, "energy": self.energy, "fmax": self.fmax, "steps": self.steps,
            "oracle": self.oracle, "in_box": self.in_box, "valid": self.valid, "parent_id": self.parent_id,
            "model_id": self.model_id, "run_id": self.run_id, "error": self.error,
        }


def atoms_to_structure_dict(atoms: Atoms) -> dict:
    clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
    # JSON round trip: tuples become lists, so a document compares equal after a store round trip.
    return json.loads(json.dumps(AseAtomsAdaptor.get_structure(clean).as_dict()))


def frames_from_arrays(positions: list[np.ndarray], energies: list[float], forces: list[np.ndarray]) -> list[Frame]:
    return [
        Frame(positions=np.round(p, 6).tolist(), energy=float(e), forces=np.round(f, 6).tolist())
        for p, e, f in zip(positions, energies, forces, strict=True)
    ]
