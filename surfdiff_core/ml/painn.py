"""PaiNN representation (Schütt, Unke, Gastegger, ICML 2021) in the schnetpack style.

Small modules (radial basis, cutoff, interaction, mixing) composed by `PaiNN`; the radial basis and
cutoff function are injected. All interaction filters come from one `filter_net` Linear over
[rbf * fcut, fcut]: the extra fcut column plays the role of the bias, so every filter vanishes
smoothly at the cutoff.

Where the time goes: with a 6 Å cutoff a slab atom has ~40 neighbours, so the cost is the pair-level
work, chiefly the filters (n_rbf x 3F multiply-adds per pair and interaction). Two implementations
of the same messages:

* the compiled operator `surfdiff::painn_messages` (CPU, float32/64; `message_op.py`, C++ in `csrc/`,
  built at install): each *undirected* pair builds its filter once, in registers, and sends both
  messages; nothing of size [pairs, 3F] is stored. Autograd to any order (sampling forces and force
  training alike), threads from torch's intra-op pool;
* eager PyTorch, the reference and the fallback (any device; used when the operator is not built or
  SURFDIFF_NO_KERNELS=1, with a one-time warning): full pair list, one `index_select` gather of the
  node quantities, `index_add_` aggregation, x^v_j * v_j formed per atom before the gather, the v = 0
  term skipped in layer one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surfdiff_core.ml.message_op import message_op_available, painn_messages

__all__ = [
    "CosineCutoff",
    "GaussianRBF",
    "PaiNN",
    "PaiNNInteraction",
    "PaiNNMixing",
    "full_to_half",
    "fused_kernels_available",
    "message_op_available",
    "half_to_full",
]


class GaussianRBF(nn.Module):
    """n_rbf Gaussians with centres evenly spaced on [start, cutoff] and width = spacing."""

    def __init__(self, n_rbf: int, cutoff: float, start: float = 0.0, trainable: bool = False) -> None:
        super().__init__()
        self.n_rbf = n_rbf
        offsets = torch.linspace(start, cutoff, n_rbf)
        widths = torch.full_like(offsets, float(offsets[1] - offsets[0]) if n_rbf > 1 else cutoff)
        if trainable:
            self.offsets = nn.Parameter(offsets)
            self.widths = nn.Parameter(widths)
        else:
            self.register_buffer("offsets", offsets)
            self.register_buffer("widths", widths)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        coeff = -0.5 / self.widths.square()
        return torch.exp(coeff * (d[..., None] - self.offsets).square())


class CosineCutoff(nn.Module):
    """0.5 (cos(pi d / rc) + 1) for d < rc, else 0 (Behler)."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        fc = 0.5 * (torch.cos(d * (math.pi / self.cutoff)) + 1.0)
        return fc * (d < self.cutoff).to(d.dtype)


def fused_kernels_available() -> bool:
    """True when the compiled message operator can be used (kept name: benchmarks and tests use it)."""
    return message_op_available()


def full_to_half(
    i: torch.Tensor, j: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep one direction of every pair of a full list: i < j, and for an atom paired with its own
    periodic image, the image whose vector is lexicographically positive."""
    vec = vectors.detach()
    positive = (vec[:, 0] > 0) | ((vec[:, 0] == 0) & ((vec[:, 1] > 0) | ((vec[:, 1] == 0) & (vec[:, 2] > 0))))
    keep = (i < j) | ((i == j) & positive)
    return i[keep], j[keep], vectors[keep]


def half_to_full(
    i: torch.Tensor, j: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of every pair of a half list."""
    return torch.cat([i, j]), torch.cat([j, i]), torch.cat([vectors, -vectors])


# ----------------------------------------------------------------------------------------------
# PaiNN modules
# ----------------------------------------------------------------------------------------------


class PaiNNInteraction(nn.Module):
    """Equivariant message passing (PaiNN eqs. 7-8): atom-wise context net x_j = phi(s_j) and

    ds_i = sum_j W^s_ij * x^s_j
    dv_i = sum_j W^r_ij * x^r_j * r_hat_ij  +  W^v_ij * x^v_j * v_j
    """

    def __init__(self, n_features: int, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.n_features = n_features
        self.context = nn.Sequential(
            nn.Linear(n_features, n_features), activation(), nn.Linear(n_features, 3 * n_features)
        )

    def forward(
        self,
        s: torch.Tensor,  # [N, F]
        v: torch.Tensor | None,  # [N, 3, F]; None stands for zeros (first interaction)
        filters: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        dir_ij: torch.Tensor,  # [P, 3] unit vectors i -> j
        i: torch.Tensor,
        j: torch.Tensor,
        fused: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager path: full pair list (i, j) and filters [P, 3F] (already cut off). Compiled operator
        (`fused`): undirected pairs (i, j), filters = (phi [P, K], Wf [K, 3F]) from which it builds
        them on the fly."""
        x = self.context(s)  # [N, 3F] = (x^s, x^r, x^v)
        if fused:
            assert isinstance(filters, tuple)
            phi, weight = filters
            ds, dv = painn_messages(phi, weight, dir_ij, x, v, i, j)
        else:
            assert isinstance(filters, torch.Tensor)
            ds, dv = self._messages(s.shape[0], x, v, filters, dir_ij, i, j)
        return s + ds, (dv if v is None else v + dv)

    def _messages(self, n_atoms, x, v, filters, dir_ij, i, j):  # eager reference implementation
        nf = self.n_features
        # split() rather than slicing: a slice's backward allocates and zero-fills the whole input
        x_sr, x_v = x.split([2 * nf, nf], dim=1)
        w_sr, w_v = filters.split([2 * nf, nf], dim=1)
        if v is None:
            m_s, m_r = (w_sr * x_sr.index_select(0, j)).split(nf, dim=1)
            m_vec = m_r[:, None, :] * dir_ij[:, :, None]  # [P, 3, F]
        else:
            # x^v_j * v_j per atom before the gather: the gathered tensor has the same size either way
            node = torch.cat([x_sr, (x_v[:, None, :] * v).reshape(n_atoms, 3 * nf)], dim=1)
            g_sr, g_v = node.index_select(0, j).split([2 * nf, 3 * nf], dim=1)
            m_s, m_r = (w_sr * g_sr).split(nf, dim=1)
            m_vec = torch.addcmul(w_v[:, None, :] * g_v.view(-1, 3, nf), m_r[:, None, :], dir_ij[:, :, None])
        ds = x.new_zeros(n_atoms, nf).index_add_(0, i, m_s)
        dv = x.new_zeros(n_atoms, 3, nf).index_add_(0, i, m_vec)
        return ds, dv


class PaiNNMixing(nn.Module):
    """Atom-wise update (PaiNN eqs. 9-11) coupling scalars and vector norms / inner products."""

    def __init__(self, n_features: int, activation: type[nn.Module] = nn.SiLU, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.n_features = n_features
        self.epsilon = epsilon
        self.vector_mix = nn.Linear(n_features, 2 * n_features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(2 * n_features, n_features), activation(), nn.Linear(n_features, 3 * n_features)
        )

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nf = self.n_features
        u, w = self.vector_mix(v).split(nf, dim=-1)  # [N, 3, F] each
        u_norm = torch.sqrt(u.square().sum(dim=1) + self.epsilon)  # eps: smooth gradient at u = 0
        a_vv, a_sv, a_ss = self.update(torch.cat([s, u_norm], dim=-1)).split(nf, dim=-1)
        v = v + a_vv[:, None, :] * w
        s = s + a_ss + a_sv * (u * w).sum(dim=1)
        return s, v


class PaiNN(nn.Module):
    """PaiNN representation: (numbers, pair vectors, pair indices) -> scalar s [N, F], vector v [N, 3, F].

    `radial_basis` (needs an `n_rbf` attribute) and `cutoff_fn` are injected, schnetpack style;
    `numbers` are atomic numbers (embedding rows up to `max_z`). The pair list must be a full list
    (i->j and j->i) or, with `half_list=True`, one entry per pair.
    """

    def __init__(
        self,
        n_features: int = 64,
        n_interactions: int = 4,
        radial_basis: nn.Module | None = None,
        cutoff_fn: nn.Module | None = None,
        max_z: int = 100,
        activation: type[nn.Module] = nn.SiLU,
        shared_interactions: bool = False,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        self.radial_basis = radial_basis if radial_basis is not None else GaussianRBF(30, 6.0)
        self.cutoff_fn = cutoff_fn if cutoff_fn is not None else CosineCutoff(6.0)
        self.n_features = n_features
        self.n_interactions = n_interactions
        self.shared_interactions = shared_interactions
        self.n_blocks = 1 if shared_interactions else n_interactions
        self.embedding = nn.Embedding(max_z + 1, n_features, padding_idx=0)
        n_rbf = int(self.radial_basis.n_rbf)
        # one Linear holds every interaction's filter weights; the last input column (fcut) acts as
        # the bias, zero-initialised like schnetpack's Dense bias
        self.filter_net = nn.Linear(n_rbf + 1, self.n_blocks * 3 * n_features, bias=False)
        with torch.no_grad():
            self.filter_net.weight[:, -1].zero_()
        self.interactions = nn.ModuleList(PaiNNInteraction(n_features, activation) for _ in range(self.n_blocks))
        self.mixing = nn.ModuleList(PaiNNMixing(n_features, activation, epsilon) for _ in range(self.n_blocks))
        self.fused: bool = True  # allow the compiled message operator where it applies

    def forward(
        self,
        numbers: torch.Tensor,
        vectors: torch.Tensor,
        i: torch.Tensor,
        j: torch.Tensor,
        n_atoms: int,
        *,
        half_list: bool = False,
        fused: bool | None = None,
        param_grads: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs: a full list (i->j and j->i, r_ij = vectors), or with half_list=True each pair once
        (messages then go both ways; `neighbor_list(..., half=True)`), which halves the filter work.

        fused: None = use the compiled message operator when possible (CPU, float32/64, operator built,
        `self.fused`); False = eager PyTorch. Both support any order of autograd.
        param_grads=False: the caller only differentiates with respect to positions (sampling forces,
        relaxations), so the operator's backward skips the filter-weight gradient.
        """
        if numbers.shape[0] != n_atoms:
            raise ValueError(f"numbers has {numbers.shape[0]} atoms, expected {n_atoms}")
        use_fused = bool(
            (self.fused if fused is None else fused)
            and vectors.device.type == "cpu"
            and vectors.dtype in (torch.float32, torch.float64)
        )
        use_fused = use_fused and message_op_available(warn=True)
        if use_fused:
            if not half_list:
                i, j, vectors = full_to_half(i, j, vectors)
        elif half_list:
            i, j, vectors = half_to_full(i, j, vectors)

        d = torch.linalg.vector_norm(vectors, dim=-1)
        dir_ij = vectors / d.clamp_min(1e-9)[:, None]
        fcut = self.cutoff_fn(d)[:, None]
        phi = torch.cat([self.radial_basis(d) * fcut, fcut], dim=-1)  # [P, K]
        nf3 = 3 * self.n_features
        filters: list
        if not use_fused:
            filters = list(self.filter_net(phi).split(nf3, dim=1))
        else:
            weight = self.filter_net.weight if param_grads else self.filter_net.weight.detach()
            filters = [(phi, weight[b * nf3 : (b + 1) * nf3].t().contiguous()) for b in range(self.n_blocks)]

        s = self.embedding(numbers)
        v: torch.Tensor | None = None
        for k in range(self.n_interactions):
            b = 0 if self.shared_interactions else k
            s, v = self.interactions[b](s, v, filters[b], dir_ij, i, j, use_fused)
            s, v = self.mixing[b](s, v)
        if v is None:  # n_interactions == 0
            v = s.new_zeros(n_atoms, 3, self.n_features)
        return s, v
