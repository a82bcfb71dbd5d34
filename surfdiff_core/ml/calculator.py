"""ASE calculator around the MLFF head of a `SurfaceModel`, for short relaxations with ASE optimisers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from surfdiff_core.geometry.batch import SlabBatch
from surfdiff_core.ml.models import SurfaceModel

__all__ = ["MLFFCalculator"]


class MLFFCalculator(Calculator):
    """Energy and forces from `SurfaceModel`'s energy head.

    The structure is treated as a slab: periodic along a1 and a2 whatever `atoms.pbc` says about z
    (a1, a2 must be periodic). Forces are returned on every atom; fix the substrate with ASE
    constraints (FixAtoms) as usual. Evaluation happens in the model's dtype on `device`.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces"]

    def __init__(self, model: SurfaceModel, device: torch.device | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        atoms = self.atoms
        assert atoms is not None
        if not (atoms.pbc[0] and atoms.pbc[1]):
            raise ValueError("MLFFCalculator models slabs: atoms.pbc must be True along a1 and a2")
        n = len(atoms)
        kw = {"device": self.device, "dtype": self.dtype}
        z = atoms.positions[:, 2]
        batch = SlabBatch(
            positions=torch.as_tensor(atoms.get_positions(), **kw),
            numbers=torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.long, device=self.device),
            cell=torch.as_tensor(np.asarray(atoms.get_cell())[None], **kw),
            batch=torch.zeros(n, dtype=torch.long, device=self.device),
            movable=torch.ones(n, dtype=torch.bool, device=self.device),
            z_bounds=torch.as_tensor([[z.min(), z.max()]], **kw),
        )
        with torch.no_grad():  # forward turns grad on for the forces only
            out = self.model(batch, None, score=False, energy=True, forces=True)
        assert out.energy is not None and out.forces is not None
        energy = float(out.energy[0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = out.forces.detach().cpu().numpy().astype(float)
        if "energies" in (properties or []):
            self.results["energies"] = self._atomic_energies(batch)

    def _atomic_energies(self, batch: SlabBatch) -> np.ndarray:
        with torch.no_grad():
            e = self.model.atomic_energies(batch)
        return e.cpu().numpy().astype(float)
