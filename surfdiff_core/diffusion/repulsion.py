"""A short-range pair repulsion that keeps generated atoms from sitting on top of each other.

A denoiser trained on few structures sometimes sends two atoms to the same site; the sample is then
invalid (a pair closer than 1 Å), and an MLFF cannot push them apart: it has never seen such a pair, and
for coinciding atoms its force vanishes by symmetry. Every real potential is strongly repulsive there, so
the sampler adds a harmonic wall to the MLFF forces (in the guidance and the relaxation after sampling):

    E = k/2 · Σ_pairs max(0, r0_ij − r)²,   r0_ij = scale · (r_cov,i + r_cov,j)

over pairs with at least one movable atom, in-plane periodic images included. The wall is zero beyond
r0 (scale 0.75 puts it well inside bonding distances: Ag–O 1.58 Å, O–O 0.99 Å, Ag–Ag 2.18 Å), so the
MLFF alone decides everything the data can teach it. Like other ML potentials' ZBL cores, it encodes
physics the training data cannot show; it never calls the oracle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from ase.data import covalent_radii

from surfdiff_core.diffusion.guidance import DenoiserFn
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from surfdiff_core.geometry.neighbors import neighbor_list, pair_vectors


@dataclass(frozen=True)
class OverlapRepulsion:
    scale: float = 0.75  # r0 as a fraction of the sum of covalent radii
    stiffness: float = 20.0  # k, eV/Å²

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.stiffness <= 0:
            raise ValueError("OverlapRepulsion needs scale > 0 and stiffness > 0")

    def energy_forces(self, batch: SlabBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy [B] in eV, forces [N, 3] in eV/Å on the movable atoms; zero on masked ones)."""
        pos = batch.positions.detach()
        radii = torch.as_tensor(covalent_radii, dtype=pos.dtype, device=pos.device)[batch.numbers]
        nl = neighbor_list(batch, self.scale * 2.0 * float(radii.max()))
        keep = batch.movable[nl.i] | batch.movable[nl.j]
        i, j = nl.i[keep], nl.j[keep]
        vec = pair_vectors(pos, nl)[keep]  # i -> j
        dist = torch.linalg.norm(vec, dim=-1)
        overlap = (self.scale * (radii[i] + radii[j]) - dist).clamp_min(0.0)
        # coinciding atoms have no direction: push along a fixed, pair-antisymmetric one (i < j: +z-ish)
        fallback = torch.tensor([0.6, 0.0, 0.8], dtype=pos.dtype, device=pos.device)
        fallback = torch.where((i < j)[:, None], fallback, -fallback)
        unit = torch.where((dist > 1e-6)[:, None], vec / dist.clamp_min(1e-6)[:, None], fallback)
        # the full list holds each pair twice: atom i gets -k·overlap along i -> j from its own entry
        forces = torch.zeros_like(pos).index_add_(0, i, -self.stiffness * overlap[:, None] * unit)
        forces = forces * batch.movable[:, None]
        energy = torch.zeros(batch.n_structures, dtype=pos.dtype, device=pos.device).index_add_(
            0, batch.batch[i], 0.25 * self.stiffness * overlap**2)  # halved: each pair is listed twice
        return energy, forces

    def wrap(self, denoise: DenoiserFn) -> DenoiserFn:
        """The denoiser with the wall added to its MLFF energies and forces (eps unchanged)."""
        return functools.partial(_repelled, denoise, self)


def _repelled(denoise: DenoiserFn, repulsion: OverlapRepulsion, batch: SlabBatch, t: torch.Tensor, *,
              with_forces: bool = False) -> DenoiserOutput:
    out = denoise(batch, t, with_forces=with_forces)
    if out.forces is None:
        return out
    energy, forces = repulsion.energy_forces(batch)
    return DenoiserOutput(eps=out.eps, forces=out.forces + forces,
                          energy=None if out.energy is None else out.energy + energy)
