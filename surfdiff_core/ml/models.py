"""The surface model: a PaiNN representation read by a time-conditioned score head (the denoiser)
and an energy head (the MLFF whose forces guide sampling).

With `ModelSpec.shared=True` one representation pass serves both heads. Time enters only the score
head, so the energy (and, by one backward pass, the forces) at the noisy positions come from the
same pass that predicts the noise: guided sampling costs one forward and one backward per step.

With `ModelSpec.energy_features > 0` the score head is also conditioned on the structure's energy above the
lowest of its composition and cell, per movable atom (E_diff, as in energy-conditioned crystal generation);
NaN means "no condition" (a learned null embedding), which training uses for classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from surfdiff_core.geometry.neighbors import NeighborList, neighbor_list, pair_vectors
from surfdiff_core.ml.painn import CosineCutoff, GaussianRBF, PaiNN

__all__ = ["EnergyConditionEmbedding", "GatedEquivariantBlock", "ModelSpec", "SurfaceModel", "TimeEmbedding"]


@dataclass
class ModelSpec:
    n_features: int = 64
    n_rbf: int = 30
    n_interactions: int = 4
    cutoff: float = 6.0  # Å, representation and neighbour-list cutoff
    elements: list[int] = field(default_factory=lambda: [8, 47])  # atomic numbers the model knows
    shared: bool = True  # one representation for score and energy (False: two PaiNNs)
    time_features: int = 32
    energy_features: int = 0  # > 0: the score head is conditioned on E_diff (classifier-free guidance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {sorted(unknown)}")
        spec = cls(**dict(data))
        spec.elements = [int(z) for z in spec.elements]
        return spec


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] on log-spaced frequencies (1 ... max_frequency rad), then
    a Linear + SiLU so the head can mix them."""

    def __init__(self, n_features: int, max_frequency: float = 1000.0) -> None:
        super().__init__()
        n_freq = max(1, n_features // 2)
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(max_frequency), n_freq)))
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, n_features), nn.SiLU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.frequencies
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


class EnergyConditionEmbedding(nn.Module):
    """E_diff (eV per movable atom) on Gaussian features over [0, 2·scale], then Linear + SiLU; NaN entries get
    a learned null embedding (the unconditional score). `scale` is set from the training data."""

    def __init__(self, n_features: int, n_centres: int = 16) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, 2.0, n_centres))
        self.register_buffer("scale", torch.ones(()))
        self.mlp = nn.Sequential(nn.Linear(n_centres, n_features), nn.SiLU())
        self.null = nn.Parameter(torch.zeros(n_features))
        self.width = 2.0 / (n_centres - 1)

    def forward(self, e_diff: torch.Tensor) -> torch.Tensor:
        known = torch.isfinite(e_diff)
        u = torch.where(known, e_diff, torch.zeros_like(e_diff)) / self.scale
        emb = self.mlp(torch.exp(-(((u[:, None] - self.centres) / self.width) ** 2)))
        return torch.where(known[:, None], emb, self.null.expand_as(emb))


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al. 2021, Fig. 3): vector channels are mixed linearly, their
    norms join the scalars in an MLP whose output gates the mixed vectors."""

    def __init__(
        self,
        n_sin: int,
        n_vin: int,
        n_sout: int,
        n_vout: int,
        n_hidden: int,
        activation: type[nn.Module] = nn.SiLU,
        scalar_activation: bool = False,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        self.n_vin, self.n_sout, self.n_vout = n_vin, n_sout, n_vout
        self.epsilon = epsilon
        self.mix_vectors = nn.Linear(n_vin, n_vin + n_vout, bias=False)
        self.scalar_net = nn.Sequential(
            nn.Linear(n_sin + n_vin, n_hidden), activation(), nn.Linear(n_hidden, n_sout + n_vout)
        )
        self.scalar_activation = activation() if scalar_activation else None

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_norm_src, v_gate_src = self.mix_vectors(v).split([self.n_vin, self.n_vout], dim=-1)
        v_norm = torch.sqrt(v_norm_src.square().sum(dim=1) + self.epsilon)  # eps: finite gradient at 0
        s_out, gate = self.scalar_net(torch.cat([s, v_norm], dim=-1)).split([self.n_sout, self.n_vout], dim=-1)
        v_out = gate[:, None, :] * v_gate_src
        if self.scalar_activation is not None:
            s_out = self.scalar_activation(s_out)
        return s_out, v_out


def _make_painn(spec: ModelSpec) -> PaiNN:
    return PaiNN(
        n_features=spec.n_features,
        n_interactions=spec.n_interactions,
        radial_basis=GaussianRBF(spec.n_rbf, spec.cutoff),
        cutoff_fn=CosineCutoff(spec.cutoff),
        max_z=max(spec.elements),
    )


class SurfaceModel(nn.Module):
    """PaiNN + score head (eps, time-conditioned, non-conservative) + energy head (MLFF).

    Energies: E = sum_i (scale * y_i + shift + atomref[Z_i]) with y_i the per-atom MLP output and
    (atomref, shift, scale) buffers set from data by `set_energy_normalisation` or
    `fit_energy_normalisation`.
    """

    def __init__(self, spec: ModelSpec | None = None) -> None:
        super().__init__()
        spec = spec if spec is not None else ModelSpec()
        if not spec.elements:
            raise ValueError("ModelSpec.elements must list the atomic numbers the model knows")
        self.spec = spec
        nf, nt = spec.n_features, spec.time_features
        max_z = max(spec.elements)
        known = torch.zeros(max_z + 1, dtype=torch.bool)
        known[torch.as_tensor(spec.elements)] = True
        self.register_buffer("known_elements", known, persistent=False)

        if spec.shared:
            self.representation = _make_painn(spec)
        else:
            self.score_representation = _make_painn(spec)
            self.energy_representation = _make_painn(spec)

        self.time_embedding = TimeEmbedding(nt)
        ne = spec.energy_features
        self.energy_condition = EnergyConditionEmbedding(ne) if ne > 0 else None
        h = max(1, nf // 2)
        self.score_head = nn.ModuleList(
            [
                GatedEquivariantBlock(nf + nt + ne, nf, h, h, n_hidden=nf, scalar_activation=True),
                GatedEquivariantBlock(h, h, 1, 1, n_hidden=h),
            ]
        )
        self.energy_head = nn.Sequential(nn.Linear(nf, h), nn.SiLU(), nn.Linear(h, 1))
        self.register_buffer("atomref", torch.zeros(max_z + 1))
        self.register_buffer("energy_shift", torch.zeros(()))
        self.register_buffer("energy_scale", torch.ones(()))

    # -- energy normalisation -------------------------------------------------------------------

    def set_energy_normalisation(
        self, atomref: Mapping[int, float] | None = None, std: float = 1.0, *, mean: float = 0.0
    ) -> None:
        """Per-element reference energies (eV/atom), per-atom scale `std` and extra shift `mean`."""
        with torch.no_grad():
            self.atomref.zero_()
            for z, e in (atomref or {}).items():
                if int(z) >= self.atomref.shape[0] or not bool(self.known_elements[int(z)]):
                    raise ValueError(f"element {z} is not in ModelSpec.elements")
                self.atomref[int(z)] = float(e)
            self.energy_shift.fill_(float(mean))
            self.energy_scale.fill_(float(std))

    @property
    def energy_std(self) -> float:
        """Per-atom energy scale (eV/atom) the energy head's output is multiplied by."""
        return float(self.energy_scale)

    def fit_energy_normalisation(
        self, energies: Sequence[float], numbers: Sequence[Sequence[int] | np.ndarray]
    ) -> dict[str, Any]:
        """Least-squares per-element references from compositions, then mean/std of the per-atom
        residual energy. Returns what was set (atomref, mean, std)."""
        elements = list(self.spec.elements)
        col = {z: k for k, z in enumerate(elements)}
        comp = np.zeros((len(energies), len(elements)))
        for r, nums in enumerate(numbers):
            for z in np.asarray(nums, dtype=int):
                if int(z) not in col:
                    raise ValueError(f"element {int(z)} is not in ModelSpec.elements")
                comp[r, col[int(z)]] += 1
        e = np.asarray(energies, dtype=float)
        ref, *_ = np.linalg.lstsq(comp, e, rcond=None)
        per_atom = (e - comp @ ref) / comp.sum(1)
        mean = float(per_atom.mean())
        std = float(per_atom.std()) if len(e) > 1 else 1.0
        std = std if std > 1e-8 else 1.0
        atomref = {z: float(ref[k]) for z, k in col.items()}
        self.set_energy_normalisation(atomref, std, mean=mean)
        return {"atomref": atomref, "mean": mean, "std": std}

    # -- evaluation -----------------------------------------------------------------------------

    def forward(
        self,
        batch: SlabBatch,
        t: torch.Tensor | float | None,
        *,
        score: bool = True,
        energy: bool = False,
        forces: bool = False,
        training_forces: bool = False,
        condition: torch.Tensor | float | None = None,
        cfg_scale: float = 1.0,
        neighbors: NeighborList | None = None,
    ) -> DenoiserOutput:
        """Evaluate the requested heads.

        t: diffusion time in [0, 1], a number or a tensor of shape [] or [B] (needed when score=True).
        Returns DenoiserOutput with eps [N, 3] (zeros when score=False; zero on masked atoms),
        energy [B] (when energy or forces) and forces [N, 3] = -dE/dR on *all* atoms (the MLFF loss
        wants them; `denoise` masks them). training_forces=True builds the graph of the forces
        (create_graph) so a force loss can be backpropagated.
        Outputs keep their autograd graph when grad mode is on; in no-grad mode they are detached
        (forces are still computed: this method turns grad on internally for them).
        condition: E_diff per structure (a number or [B]; NaN or None = unconditional) for a model with
        energy_features; cfg_scale w mixes eps = eps_null + w·(eps_cond − eps_null) (classifier-free guidance:
        1 = conditional only; the representation is computed once for both).
        neighbors: the batch's half pair list at this model's cutoff, when the caller already has it (a committee
        evaluates several models on one batch); found here otherwise.
        """
        forces = forces or training_forces
        want_energy = energy or forces
        grad_mode = torch.is_grad_enabled()
        self._check_numbers(batch.numbers)

        pos = batch.positions
        if forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        nl = neighbors if neighbors is not None else neighbor_list(batch, self.spec.cutoff, half=True)
        n_atoms = batch.n_atoms
        # the compiled message op differentiates to any order, so force training uses it too
        kw: dict[str, Any] = {"half_list": True, "param_grads": grad_mode}

        eps = energies = force = None
        with torch.set_grad_enabled(grad_mode or forces):
            vectors = pair_vectors(pos, nl)
            if self.spec.shared:
                s, v = self.representation(batch.numbers, vectors, nl.i, nl.j, n_atoms, **kw)
                s_e = s
            else:
                s = v = s_e = None
                if score:
                    s, v = self.score_representation(batch.numbers, vectors, nl.i, nl.j, n_atoms, **kw)
                if want_energy:
                    s_e, _ = self.energy_representation(batch.numbers, vectors, nl.i, nl.j, n_atoms, **kw)
            if want_energy:
                assert s_e is not None
                energies = self._energy(s_e, batch)
                if forces:
                    (grad,) = torch.autograd.grad(
                        energies.sum(), pos, create_graph=training_forces, retain_graph=grad_mode or training_forces
                    )
                    force = -grad
            if score:
                assert s is not None and v is not None
                with torch.set_grad_enabled(grad_mode):  # sampling: no graph for the score head
                    eps = self._score(s, v, t, batch, condition)
                    if cfg_scale != 1.0 and condition is not None:
                        null = self._score(s, v, t, batch, None)
                        eps = null + cfg_scale * (eps - null)

        if not grad_mode:
            eps = None if eps is None else eps.detach()
            energies = None if energies is None else energies.detach()
            force = None if force is None else force.detach()
        if eps is None:
            eps = torch.zeros_like(batch.positions)
        return DenoiserOutput(eps=eps, forces=force, energy=energies)

    @torch.no_grad()
    def denoise(self, batch: SlabBatch, t: torch.Tensor | float, *, with_forces: bool = False,
                condition: torch.Tensor | float | None = None, cfg_scale: float = 1.0) -> DenoiserOutput:
        """Sampler entry point: eps (and energies + forces at the same noisy positions when
        with_forces), all detached, with forces zeroed on masked atoms."""
        out = self.forward(batch, t, score=True, energy=with_forces, forces=with_forces, condition=condition,
                           cfg_scale=cfg_scale)
        if out.forces is None:
            return out
        return DenoiserOutput(eps=out.eps, forces=out.forces * batch.movable[:, None], energy=out.energy)

    def _check_numbers(self, numbers: torch.Tensor) -> None:
        if numbers.numel() == 0:
            return
        z_max = int(numbers.max())
        if z_max >= self.known_elements.shape[0] or not bool(self.known_elements[numbers].all()):
            found = sorted(set(numbers.unique().tolist()))
            raise ValueError(f"model knows elements {self.spec.elements}, batch has {found}")

    def _atom_energies(self, s: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
        y = self.energy_head(s).squeeze(-1)
        return self.energy_scale * y + self.energy_shift + self.atomref[batch.numbers]

    def _energy(self, s: torch.Tensor, batch: SlabBatch) -> torch.Tensor:
        e_atom = self._atom_energies(s, batch)
        return torch.zeros(batch.n_structures, dtype=e_atom.dtype, device=e_atom.device).index_add_(
            0, batch.batch, e_atom
        )

    def atomic_energies(self, batch: SlabBatch) -> torch.Tensor:
        """Per-atom energy contributions [N] (they sum to the structure energies)."""
        self._check_numbers(batch.numbers)
        nl = neighbor_list(batch, self.spec.cutoff, half=True)
        repr_ = self.representation if self.spec.shared else self.energy_representation
        s, _ = repr_(
            batch.numbers,
            pair_vectors(batch.positions, nl),
            nl.i,
            nl.j,
            batch.n_atoms,
            half_list=True,
            param_grads=torch.is_grad_enabled(),
        )
        return self._atom_energies(s, batch)

    @property
    def use_fused_kernels(self) -> bool:
        """Whether the PaiNN(s) may use the compiled message op on CPU (eager PyTorch otherwise)."""
        return all(m.fused for m in self.modules() if isinstance(m, PaiNN))

    @use_fused_kernels.setter
    def use_fused_kernels(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, PaiNN):
                m.fused = bool(value)

    @staticmethod
    def _per_structure(x: torch.Tensor | float, batch: SlabBatch, like: torch.Tensor, name: str) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
        if x.dim() == 0:
            x = x.expand(batch.n_structures)
        if x.shape != (batch.n_structures,):
            raise ValueError(f"{name} must be a number or have shape [B] = [{batch.n_structures}], "
                             f"got {tuple(x.shape)}")
        return x

    def _score(
        self, s: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float | None, batch: SlabBatch,
        condition: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        if t is None:
            raise ValueError("the score head needs the diffusion time t")
        temb = self.time_embedding(self._per_structure(t, batch, s, "t"))
        if self.energy_condition is not None:
            c = self._per_structure(math.nan if condition is None else condition, batch, s, "condition")
            temb = torch.cat([temb, self.energy_condition(c)], dim=-1)
        elif condition is not None and bool(torch.isfinite(torch.as_tensor(condition)).any()):
            raise ValueError("this model was trained without energy conditioning (model.energy_features = 0)")
        h = torch.cat([s, temb[batch.batch]], dim=-1)
        for block in self.score_head:
            h, v = block(h, v)
        return v[:, :, 0] * batch.movable[:, None].to(v.dtype)
