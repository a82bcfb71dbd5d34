"""The document of one relaxation, whichever route ran it: the RSS (surfdiff_core.rss), the oracle labels of
samples (stages/oracle_relax) and the relax stage (jobflow, stages/relax).

Each route decides its ids, provenance and meta; what the relaxation gave (final structure, energy, forces, fmax,
steps, frames, whether it stayed in the box) or why it failed is written here, one way for all, so that training
and evaluation read every route's documents alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from surfdiff_core.store.documents import StructureDoc, atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import RELAXED_BOX_TOLERANCE, in_confinement_box

if TYPE_CHECKING:
    from surfdiff_core.relax.ase_relax import RelaxResult
    from surfdiff_core.relax.jobflow_relax import RelaxOutcome

ERROR_CHARS = 500  # a stored error: the message, not a whole traceback
# What a relaxed child copies of the sample it started from: its system and where that sample came from.
PARENT_FIELDS = frozenset({"composition", "formula", "system_id", "element", "facet", "cell", "n_substrate",
                           "movable", "fixed", "z_box", "model_id", "seed"})


@dataclass(frozen=True)
class Relaxed:
    """What a finished relaxation gave, by any route; None where the route does not say."""

    atoms: Atoms  # the final structure
    energy: float | None
    forces: np.ndarray | None  # [n, 3] eV/Å
    fmax: float | None  # over the movable atoms
    steps: int | None  # optimiser steps
    converged: bool | None
    wall_time: float | None = None
    frames: Sequence[dict] = ()  # {positions, energy, forces}: MLFF training data

    @classmethod
    def from_ase(cls, res: RelaxResult) -> Relaxed:
        """A relaxation run here (relax_atoms)."""
        return cls(atoms=res.atoms, energy=res.energy, forces=res.forces, fmax=res.fmax, steps=res.steps,
                   converged=res.converged, wall_time=res.wall_time, frames=res.trajectory)

    @classmethod
    def from_outcome(cls, out: RelaxOutcome, fixed: Sequence[int]) -> Relaxed:
        """A successful jobflow relaxation; fmax over the atoms not in `fixed` (job documents do not give it)."""
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(out.structure)
        atoms.pbc = [True, True, False]
        forces = np.asarray(out.forces) if out.forces is not None else None
        fmax = None
        if forces is not None:
            free = np.ones(len(forces), bool)
            free[list(fixed)] = False
            fmax = float(np.linalg.norm(forces[free], axis=1).max())
        return cls(atoms=atoms, energy=out.energy, forces=forces, fmax=fmax, steps=out.steps,
                   converged=out.converged)


def error_text(exc: BaseException) -> str:
    """How a failed relaxation's exception is stored (and counted in meta.errors)."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]


def parent_fields(parent: StructureDoc, *extra: str) -> dict[str, Any]:
    """The fields a relaxed child takes from its parent (PARENT_FIELDS, `extra`), its parent_id included."""
    return {"parent_id": parent.doc_id, **parent.model_dump(include=PARENT_FIELDS | set(extra))}


def relaxation_record(outcome: Relaxed | str, start: dict, *, box: tuple[int, Sequence[float]], in_place: bool = False,
                      keep_start: bool = False, **fields: Any) -> StructureDoc:
    """The document of one relaxation: `fields` (id, source, provenance, meta) and what `outcome` gave, or, when
    `outcome` is an error message, an invalid document at `start` (the structure it started from) with that error.

    in_place: store `start` as the structure (a single point: zero steps, the input is what was labelled);
    keep_start: store `start` as initial_structure of a finished relaxation; box: (n_substrate, z_box) of the
    confinement box that decides in_box, with RELAXED_BOX_TOLERANCE."""
    if isinstance(outcome, str):
        return StructureDoc(structure=start, valid=False, error=outcome[:ERROR_CHARS], **fields)
    if keep_start:
        fields["initial_structure"] = start
    frames = outcome.frames
    return StructureDoc(
        structure=start if in_place else atoms_to_structure_dict(outcome.atoms),
        energy=_maybe(float, outcome.energy),
        forces=np.round(outcome.forces, 6).tolist() if outcome.forces is not None else None,
        fmax=_maybe(float, outcome.fmax), steps=_maybe(int, outcome.steps),
        converged=_maybe(bool, outcome.converged), wall_time=_maybe(float, outcome.wall_time),
        in_box=bool(np.all(in_confinement_box(outcome.atoms.positions, *box, RELAXED_BOX_TOLERANCE))),
        trajectory=frames_from_arrays([f["positions"] for f in frames], [f["energy"] for f in frames],
                                      [f["forces"] for f in frames]),
        **fields,
    )


def _maybe(cast: type, value: Any) -> Any:
    return None if value is None else cast(value)
