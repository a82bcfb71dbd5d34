"""An MLFF committee: the mean energy and forces of several independently trained models, and their spread.

The sampling model (denoiser + MLFF) and its MLFF-only members (train.ensemble) each predict energies and
forces; the committee's mean relaxes the samples and ranks them, since errors that differ from model to model
average out. The standard deviation of the energies is stored beside it; whether it flags the MLFF's errors is
measured by the evaluation (`committee_calibration`), not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from surfdiff_core.geometry.neighbors import neighbor_list
from surfdiff_core.ml.models import SurfaceModel


@dataclass(frozen=True)
class CommitteePrediction:
    energy: torch.Tensor  # [B] mean energy (eV)
    energy_std: torch.Tensor  # [B] standard deviation of the members' energies (eV; 0 for one model)
    forces: torch.Tensor  # [N, 3] mean forces (eV/Å) on all atoms


class Committee:
    """The mean of several MLFFs, callable where a denoiser is (`mlff_relax`, the overlap wall): eps is zero."""

    def __init__(self, models: Sequence[SurfaceModel]) -> None:
        if not models:
            raise ValueError("a committee needs at least one model")
        self.models = list(models)

    def __len__(self) -> int:
        return len(self.models)

    def predict(self, batch: SlabBatch) -> CommitteePrediction:
        energies, forces = [], []
        # one pair list for every member of one cutoff (the geometry is the same; ~15 % of a member's call on CPU)
        cutoffs = {m.spec.cutoff for m in self.models}
        shared = neighbor_list(batch, cutoffs.pop(), half=True) if len(cutoffs) == 1 else None
        for model in self.models:
            out = model(batch, None, score=False, energy=True, forces=True, neighbors=shared)
            energies.append(out.energy)
            forces.append(out.forces)
        e = torch.stack(energies)
        std = e.std(dim=0, unbiased=True) if len(self.models) > 1 else torch.zeros_like(e[0])
        return CommitteePrediction(energy=e.mean(0), energy_std=std, forces=torch.stack(forces).mean(0))

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool = True) -> DenoiserOutput:
        pred = self.predict(batch)
        forces = torch.where(batch.movable[:, None], pred.forces, torch.zeros_like(pred.forces))
        return DenoiserOutput(eps=torch.zeros_like(batch.positions), forces=forces, energy=pred.energy)
