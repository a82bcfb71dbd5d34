"""A batch of surface slabs as flat tensors: the one data structure the models and samplers share.

Slabs are periodic along the first two cell vectors and not along the third (the surface normal, z).
Substrate atoms are *masked*: `movable` is False for them, and nothing (noise, score, guidance,
relaxation) ever moves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from ase import Atoms


@dataclass(frozen=True)
class SlabBatch:
    positions: torch.Tensor  # [N, 3] Cartesian, Å
    numbers: torch.Tensor  # [N] long, atomic numbers
    cell: torch.Tensor  # [B, 3, 3] rows are the cell vectors a1, a2 (in-plane) and a3 (along z)
    batch: torch.Tensor  # [N] long, index of the structure each atom belongs to
    movable: torch.Tensor  # [N] bool, True for overlayer atoms being placed, False for masked substrate
    z_bounds: torch.Tensor  # [B, 2] confinement box (z_min, z_max), absolute z in Å

    @property
    def n_structures(self) -> int:
        return int(self.cell.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def with_positions(self, positions: torch.Tensor) -> SlabBatch:
        return replace(self, positions=positions)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SlabBatch:
        fdtype = dtype or self.positions.dtype
        return SlabBatch(
            positions=self.positions.to(device, fdtype),
            numbers=self.numbers.to(device),
            cell=self.cell.to(device, fdtype),
            batch=self.batch.to(device),
            movable=self.movable.to(device),
            z_bounds=self.z_bounds.to(device, fdtype),
        )

    def select(self, keep: torch.Tensor) -> SlabBatch:
        """The sub-batch of the structures where keep ([B] bool) is True, in their order, renumbered from 0."""
        if keep.shape != (self.n_structures,) or keep.dtype != torch.bool:
            raise ValueError(f"select needs a [{self.n_structures}] bool mask, got {tuple(keep.shape)} {keep.dtype}")
        atoms = keep[self.batch]
        new_index = torch.cumsum(keep.long(), 0) - 1
        return SlabBatch(
            positions=self.positions[atoms],
            numbers=self.numbers[atoms],
            cell=self.cell[keep],
            batch=new_index[self.batch[atoms]],
            movable=self.movable[atoms],
            z_bounds=self.z_bounds[keep],
        )

    def atoms_per_structure(self) -> torch.Tensor:
        return torch.bincount(self.batch, minlength=self.n_structures)

    def to_atoms(self) -> list[Atoms]:
        """Back to ASE Atoms (pbc in-plane only); the substrate mask is stored as the 'movable' array."""
        pos = self.positions.detach().cpu().numpy()
        num = self.numbers.detach().cpu().numpy()
        mov = self.movable.detach().cpu().numpy()
        cell = self.cell.detach().cpu().numpy()
        idx = self.batch.detach().cpu().numpy()
        out = []
        for b in range(self.n_structures):
            sel = idx == b
            atoms = Atoms(numbers=num[sel], positions=pos[sel], cell=cell[b], pbc=[True, True, False])
            atoms.set_array("movable", mov[sel].astype(bool))
            out.append(atoms)
        return out


def collate(
    structures: Sequence[Atoms],
    movable: Sequence[np.ndarray],
    z_bounds: Sequence[tuple[float, float]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SlabBatch:
    """Stack ASE slabs (with per-atom movable masks and confinement boxes) into one SlabBatch."""
    if not (len(structures) == len(movable) == len(z_bounds)):
        raise ValueError("structures, movable and z_bounds must have the same length")
    positions = np.concatenate([a.get_positions() for a in structures])
    numbers = np.concatenate([a.get_atomic_numbers() for a in structures])
    cells = np.stack([np.asarray(a.get_cell()) for a in structures])
    batch = np.concatenate([np.full(len(a), i) for i, a in enumerate(structures)])
    mov = np.concatenate([np.asarray(m, dtype=bool) for m in movable])
    return SlabBatch(
        positions=torch.as_tensor(positions, dtype=dtype, device=device),
        numbers=torch.as_tensor(numbers, dtype=torch.long, device=device),
        cell=torch.as_tensor(cells, dtype=dtype, device=device),
        batch=torch.as_tensor(batch, dtype=torch.long, device=device),
        movable=torch.as_tensor(mov, dtype=torch.bool, device=device),
        z_bounds=torch.as_tensor(np.asarray(z_bounds, dtype=float), dtype=dtype, device=device),
    )


@dataclass(frozen=True)
class DenoiserOutput:
    """What one model evaluation returns to a sampler.

    eps: [N, 3] predicted unit-variance noise (score = -eps / (sigma_t * length_scale)); zero on masked atoms.
    forces: [N, 3] MLFF forces in eV/Å (None unless asked for); `SurfaceModel.denoise` zeroes masked atoms.
    energy: [B] MLFF energies in eV (None unless forces/energy were asked for).
    """

    eps: torch.Tensor
    forces: torch.Tensor | None = None
    energy: torch.Tensor | None = None
