"""Novelty guidance: push samples away from minima already found, in a descriptor of the overlayer that respects
the slab's symmetry and periodicity.

Descriptor (`PairDescriptor`): for every overlayer (movable) atom i and every neighbour j within the cutoff
(substrate and overlayer, in-plane periodic images included), a Gaussian-smeared radial histogram of r_ij in the
channel of the element pair (Z_i, Z_j), smoothly cut off; summed over atoms and scaled to unit length. It is
invariant to permutations of like atoms, to rotations and translations of the whole slab and to lattice
translations, so symmetry-equivalent copies of a minimum share one descriptor; its overlayer–substrate channels
carry the adsorption sites.

Guidance (`NoveltyGuidance`): a Gaussian-kernel repulsion K(x) = Σ_m exp(−‖D(x) − D_m‖² / 2h²) from the known
minima's descriptors D_m, evaluated at the denoiser's estimate of the clean structure x̂0 (from eps: a noisy
x_t looks like no minimum, but its x̂0 shows which basin the trajectory is heading for while that is still being
decided); its force −∇K (autograd w.r.t. x̂0, applied to x_t: the model's Jacobian is not formed) enters like
the MLFF force of ForceFieldGuidance: the displacement per step is strength·(1 − t)·(−∇K), capped per atom. It
composes with force-field guidance (`SumGuidance`). De-duplication stays with the StructureMatcher: this only
steers sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.guidance import cap_norm
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from surfdiff_core.geometry.neighbors import neighbor_list, pair_vectors


@dataclass(frozen=True)
class PairDescriptor:
    """Per-element-pair radial histograms of the overlayer's neighbourhoods (see the module docstring)."""

    species: tuple[int, ...]  # atomic numbers of every element the structures may hold, sorted
    cutoff: float = 6.0  # Å
    n_bins: int = 24
    width: float = 0.25  # Å, Gaussian smearing of each distance

    @property
    def size(self) -> int:
        return len(self.species) ** 2 * self.n_bins

    def __call__(self, batch: SlabBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Descriptors [B, size] of the batch at `positions` (default its own), differentiable w.r.t. them."""
        pos = batch.positions if positions is None else positions
        nl = neighbor_list(batch.with_positions(pos.detach()), self.cutoff)
        keep = batch.movable[nl.i]
        i, j = nl.i[keep], nl.j[keep]
        r = torch.linalg.vector_norm(pair_vectors(pos, nl)[keep], dim=-1)
        centres = torch.linspace(0.5, self.cutoff, self.n_bins, dtype=pos.dtype, device=pos.device)
        smooth = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)  # → 0 at the cutoff, no jump in D
        g = torch.exp(-((r[:, None] - centres) ** 2) / (2 * self.width**2)) * smooth[:, None]
        lookup = torch.full((int(max(self.species)) + 1,), -1, dtype=torch.long, device=pos.device)
        lookup[torch.as_tensor(self.species, device=pos.device)] = torch.arange(len(self.species), device=pos.device)
        zi, zj = lookup[batch.numbers[i]], lookup[batch.numbers[j]]
        if bool((zi < 0).any() or (zj < 0).any()):
            raise ValueError("PairDescriptor: an element of the batch is not in its species")
        row = batch.batch[i] * len(self.species) ** 2 + zi * len(self.species) + zj
        d = torch.zeros(batch.n_structures * len(self.species) ** 2, self.n_bins, dtype=pos.dtype, device=pos.device)
        d = d.index_add(0, row, g).reshape(batch.n_structures, -1)
        return d / torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min(1e-12)


def predict_clean(process: SurfaceDiffusion | SurfaceFlow, batch: SlabBatch, t: torch.Tensor,
                  eps: torch.Tensor) -> torch.Tensor:
    """x̂0 from the model output at per-structure times t: the kernel mean inverted (diffusion; in z the VP
    shrinkage undone) or the straight path followed back (flow); wrapped and clamped into the box."""
    geo = SlabGeometry.from_batch(batch)
    tb = t[batch.batch, None].to(eps.dtype)
    if isinstance(process, SurfaceFlow):
        x0 = batch.positions - tb * process.velocity(eps)
    else:
        a = process.schedule.alpha(tb)
        m = batch.positions - process.std(tb) * eps
        z = geo.z_center + (m[:, 2] - geo.z_center) / a[:, 0]
        x0 = torch.cat([m[:, :2], z[:, None]], dim=1)
    return torch.where(batch.movable[:, None], geo.confine(x0), batch.positions)


@dataclass(frozen=True)
class NoveltyGuidance:
    """strength·(1 − t)·(−∇K)/dt as a rate, K the kernel repulsion from `minima` [M, size] (descriptors of
    known minima); bandwidth h in descriptor units (unit-length descriptors: 0 = same, √2 = orthogonal)."""

    descriptor: PairDescriptor
    minima: torch.Tensor
    process: SurfaceDiffusion | SurfaceFlow | None = None  # None: K at x_t itself instead of x̂0
    strength: float = 0.02  # Å²: displacement per step at t = 0 is strength·‖∇K‖
    bandwidth: float = 0.15
    max_displacement: float | None = 0.1  # Å per step and atom
    needs_forces: bool = field(default=False, init=False)

    def repulsion(self, batch: SlabBatch, positions: torch.Tensor) -> torch.Tensor:
        """K per structure [B]."""
        d = self.descriptor(batch, positions)
        dist2 = torch.cdist(d, self.minima.to(d.dtype)) ** 2
        return torch.exp(-dist2 / (2 * self.bandwidth**2)).sum(-1)

    def __call__(self, batch: SlabBatch, t: torch.Tensor, out: DenoiserOutput, *, dt: float) -> torch.Tensor:
        if dt <= 0:
            raise ValueError("dt must be positive")
        if self.minima.shape[0] == 0 or self.strength == 0:
            return torch.zeros_like(batch.positions)
        x0 = batch.positions if self.process is None else predict_clean(self.process, batch, t, out.eps)
        with torch.enable_grad():  # samplers run under no_grad
            pos = x0.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.repulsion(batch, pos).sum(), pos)
        step = cap_norm(self.strength * (1.0 - t)[batch.batch, None] * -grad, self.max_displacement)
        return torch.where(batch.movable[:, None], step / dt, torch.zeros_like(step))


@dataclass(frozen=True)
class SumGuidance:
    """Several guidance terms added (e.g. force field + novelty); forces are asked for when any needs them."""

    parts: tuple
    needs_forces: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_forces", any(p.needs_forces for p in self.parts))

    def __call__(self, batch: SlabBatch, t: torch.Tensor, out: DenoiserOutput, *, dt: float) -> torch.Tensor:
        return sum((p(batch, t, out, dt=dt) for p in self.parts), torch.zeros_like(batch.positions))
