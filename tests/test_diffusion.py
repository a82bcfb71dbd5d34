"""Tests of the surface diffusion process, samplers, guidance, relaxation and validity checks.

All models here are analytic: the exact eps of a known data distribution and a harmonic force field.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import fcc111
from scipy.stats import kstest, truncnorm

from surfdiff_core.diffusion.guidance import ForceFieldGuidance, Guidance
from surfdiff_core.diffusion.process import (
    SlabGeometry,
    SurfaceDiffusion,
    in_plane_lattice,
    log_ndtr_diff,
    minimum_image,
    truncated_normal,
    wrapped_normal_score,
)
from surfdiff_core.diffusion.samplers import SAMPLERS, _quantile_map, ddim, euler_maruyama, probability_flow_ode
from surfdiff_core.diffusion.schedule import VPSchedule, alpha, beta, int_beta, sigma
from surfdiff_core.diffusion.validity import check_validity
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch, collate
from surfdiff_core.relax.mlff import mlff_relax

BOX = (1.5, 7.5)  # confinement box above the top substrate layer, Å


@pytest.fixture(autouse=True)
def _single_thread():
    """The tensors here are tiny: intra-op threads only add sync overhead (and stall badly when the
    cores are shared), so run each test single-threaded and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(
    n_struct: int,
    n_over: int,
    *,
    seed: int = 0,
    size: tuple[int, int, int] = (2, 2, 2),
    frac_xy: tuple[float, float] | None = None,
    z_rel: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> SlabBatch:
    """Cu(111) slabs with n_over O atoms: random in the box, or all at frac_xy / z_rel when given."""
    rng = np.random.default_rng(seed)
    slab = fcc111("Cu", size=size, vacuum=8.0)
    top = slab.positions[:, 2].max()
    cell = np.asarray(slab.cell)
    structures, movable, bounds = [], [], []
    for _ in range(n_struct):
        atoms = slab.copy()
        f = rng.random((n_over, 2)) if frac_xy is None else np.tile(frac_xy, (n_over, 1))
        z = top + (rng.uniform(*BOX, n_over) if z_rel is None else np.full(n_over, z_rel))
        for k in range(n_over):
            atoms.append("O")
            atoms.positions[-1] = f[k] @ cell[:2] + np.array([0.0, 0.0, z[k]])
        structures.append(atoms)
        movable.append(np.r_[np.zeros(len(slab), bool), np.ones(n_over, bool)])
        bounds.append((top + BOX[0], top + BOX[1]))
    return collate(structures, movable, bounds, dtype=dtype)


def frac_coords(batch: SlabBatch) -> torch.Tensor:
    _, inv = in_plane_lattice(batch.cell)
    return torch.einsum("ni,nij->nj", batch.positions[:, :2], inv[batch.batch])


GH_NODES, GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)  # ∫ N(x; 0, 1) f(x) dx quadrature


def z_log_marginal(
    process: SurfaceDiffusion,
    mu_z: torch.Tensor,
    s_z: float,
    z: torch.Tensor,
    t: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    zc: torch.Tensor,
) -> torch.Tensor:
    """log p_t(z) + const for data z0 ~ N(mu_z, s_z²) under the truncated kernel, exact inside the box:
    p_t(z) = ∫ N(z0; mu_z, s_z²) N(z; m_t(z0), s²) / Z(z0) dz0
           = N(z; m_t(mu_z), α²s_z² + s²) · E_{z0 ~ N(mu_post(z), v_post)}[1 / Z(z0)],
    the Gaussian product done in closed form and the smooth 1/Z by Gauss–Hermite quadrature."""
    nodes = torch.as_tensor(GH_NODES, dtype=torch.float64)
    logw = torch.log(torch.as_tensor(GH_WEIGHTS / GH_WEIGHTS.sum(), dtype=torch.float64))
    a, s = process.schedule.alpha(t), process.std(t)
    log_gauss = -((z - zc - a * (mu_z - zc)) ** 2) / (2 * (a * a * s_z**2 + s * s))
    v_post = 1 / (1 / s_z**2 + a * a / (s * s))
    mu_post = v_post * (mu_z / s_z**2 + a * (z - zc * (1 - a)) / (s * s))
    m = zc[:, None] + a[:, None] * (mu_post[:, None] + v_post.sqrt()[:, None] * nodes - zc[:, None])
    log_z = log_ndtr_diff((lo[:, None] - m) / s[:, None], (hi[:, None] - m) / s[:, None])
    return log_gauss + torch.logsumexp(logw - log_z, dim=-1)


class GaussianData:
    """Exact eps of the perturbed marginal for data: every movable atom in-plane N(mu_xy, s²) (wrapped),
    z ~ N(mu_z, s_z²); in z either the Gaussian convolution (exact when mu_z is far from the walls) or,
    with exact_z, the quadrature of the truncated kernel (`z_marginal_terms`).
    Optional harmonic MLFF E = ½ k |x − x*|² (minimum image in-plane)."""

    def __init__(
        self,
        process: SurfaceDiffusion,
        mu: torch.Tensor,
        s: float,
        s_z: float,
        k: float = 0.0,
        x_star: torch.Tensor | None = None,
        exact_z: bool = False,
    ) -> None:
        self.process, self.mu, self.s, self.s_z, self.k = process, mu, s, s_z, k
        self.x_star = mu if x_star is None else x_star
        self.exact_z = exact_z
        self.calls = 0

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput:
        self.calls += 1
        geo = SlabGeometry.from_batch(batch)
        tb = t[batch.batch]
        sch, L = self.process.schedule, self.process.length_scale
        a, sig = sch.alpha(tb), sch.sigma(tb) * L
        pos = batch.positions
        score_xy = wrapped_normal_score(pos[:, :2] - self.mu[:, :2], self.s**2 + sig**2, geo.lattice, geo.inv_lattice)
        if self.exact_z:
            with torch.enable_grad():  # samplers run under no_grad
                z = pos[:, 2].detach().double().requires_grad_(True)
                args = (v.double() for v in (self.mu[:, 2], tb, geo.z_lo, geo.z_hi, geo.z_center))
                mu_z, tt, lo, hi, zc = args
                logp = z_log_marginal(self.process, mu_z, self.s_z, z, tt, lo, hi, zc)
                (score_z,) = torch.autograd.grad(logp.sum(), z)
            score_z = score_z.to(pos.dtype)
        else:
            mean_z = geo.z_center + a * (self.mu[:, 2] - geo.z_center)
            score_z = -(pos[:, 2] - mean_z) / (a**2 * self.s_z**2 + sig**2)
        eps = -sig[:, None] * torch.cat([score_xy, score_z[:, None]], dim=1)
        eps = torch.where(batch.movable[:, None], eps, torch.zeros_like(eps))
        if not with_forces:
            return DenoiserOutput(eps=eps)
        forces, energy = harmonic(batch, self.x_star, self.k)
        return DenoiserOutput(eps=eps, forces=forces, energy=energy)


def harmonic(batch: SlabBatch, x_star: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    geo = SlabGeometry.from_batch(batch)
    d = batch.positions - x_star
    d = torch.cat([geo.minimum_image(d[:, :2]), d[:, 2:]], dim=1)
    d = torch.where(batch.movable[:, None], d, torch.zeros_like(d))
    e_atom = 0.5 * k * (d * d).sum(-1)
    energy = torch.zeros(batch.n_structures, dtype=d.dtype).index_add_(0, batch.batch, e_atom)
    return -k * d, energy


class HarmonicMLFF:
    """Harmonic wells at x_star. Given a sub-batch (batch.select), it finds each structure's wells by the
    length of its third cell vector, which `distinct_cells` makes unique per structure."""

    def __init__(self, x_star: torch.Tensor, k: float, full: SlabBatch | None = None) -> None:
        self.x_star, self.k, self.full = x_star, k, full
        self.calls: list[int] = []

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput:
        self.calls.append(batch.n_structures)
        x_star = self.x_star
        if self.full is not None and batch.n_structures != self.full.n_structures:
            original = [int((self.full.cell[:, 2, 2] == c).nonzero()) for c in batch.cell[:, 2, 2]]
            x_star = torch.cat([self.x_star[self.full.batch == b] for b in original])
        f, e = harmonic(batch, x_star, self.k)
        return DenoiserOutput(eps=torch.zeros_like(f), forces=f, energy=e)


def distinct_cells(batch: SlabBatch) -> SlabBatch:
    """The same slabs with the (non-periodic) third cell vector lengthened by b Å in structure b."""
    cell = batch.cell.clone()
    cell[:, 2, 2] += torch.arange(batch.n_structures, dtype=cell.dtype)
    return replace(batch, cell=cell)


def gaussian_setup(n_struct: int, z_rel: float = sum(BOX) / 2, dtype: torch.dtype = torch.float32):
    """One O atom per structure; data centred near the cell corner so that wrapping matters."""
    batch = make_batch(n_struct, 1, size=(2, 2, 1), frac_xy=(0.95, 0.9), z_rel=z_rel, dtype=dtype)
    return batch, batch.positions.clone()


def z_mixture_cdf(process: SurfaceDiffusion, batch: SlabBatch, mu: torch.Tensor, s_z: float, t: float) -> np.ndarray:
    """Exact CDF of the z marginal at time t (≳ 0.1, where the kernel is smooth on the data scale),
    evaluated at the movable atoms' z: quadrature over z0 of the truncated-normal kernel CDFs."""
    m_ = batch.movable
    geo = SlabGeometry.from_batch(batch)
    z = batch.positions[m_, 2].double()
    lo, hi, zc = geo.z_lo[m_].double(), geo.z_hi[m_].double(), geo.z_center[m_].double()
    nodes = torch.as_tensor(GH_NODES, dtype=torch.float64)
    w = torch.as_tensor(GH_WEIGHTS / GH_WEIGHTS.sum(), dtype=torch.float64)
    a, s = process.schedule.alpha(t), process.std(t)
    m = zc[:, None] + a * (mu[m_, 2].double()[:, None] + s_z * nodes - zc[:, None])
    lo_n, hi_n, zeta = ((v[:, None] - m) / s for v in (lo, hi, z))
    log_z = log_ndtr_diff(lo_n, hi_n)
    # mixture over z0 with weights prior(z0) / Z(z0), normalised; each component's truncated CDF
    mix = torch.softmax(torch.log(w) - log_z, dim=-1)
    return (mix * torch.exp(log_ndtr_diff(lo_n, zeta) - log_z)).sum(-1).numpy()


def wrapped_stats(batch: SlabBatch, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    geo = SlabGeometry.from_batch(batch)
    m = batch.movable
    d = batch.positions[m] - mu[m]
    d = torch.cat([minimum_image(d[:, :2], geo.lattice[m], geo.inv_lattice[m]), d[:, 2:]], dim=1)
    return d.mean(0), d.std(0)


# --------------------------------------------------------------------------------------------------
# schedule


def test_schedule_identities() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sch = VPSchedule()
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))
    assert sch.alpha(0.0) == 1.0 and sch.sigma(0.0) == 0.0
    h = 1e-6
    fd = (int_beta(t[1:-1] + h) - int_beta(t[1:-1] - h)) / (2 * h)
    assert torch.allclose(fd, beta(t[1:-1]), atol=1e-6)
    assert math.isclose(float(sigma(torch.tensor(0.3))), sigma(0.3), rel_tol=1e-6)
    assert math.isclose(alpha(1.0, 0.01, 3.0), math.exp(-0.5 * (0.01 + 1.495)))
    with pytest.raises(ValueError):
        VPSchedule(beta_min=0.0)
    process = SurfaceDiffusion(VPSchedule())
    for power in (1.0, 2.0):
        ts = process.time_grid(10, power)
        assert ts[0] == 1.0 and math.isclose(ts[-1], process.t_min) and ts == sorted(ts, reverse=True)
    assert np.allclose(np.diff(process.time_grid(10)), -(1 - process.t_min) / 10)


# --------------------------------------------------------------------------------------------------
# forward process


def test_truncated_normal_matches_scipy() -> None:
    from scipy.stats import truncnorm

    g = torch.Generator().manual_seed(0)
    m = torch.zeros(20000, dtype=torch.float64)
    for lo, hi in [(-1.0, 0.5), (2.0, 3.0), (-4.0, -3.0)]:
        x = truncated_normal(m, torch.tensor(1.0), torch.tensor(lo), torch.tensor(hi), g)
        assert kstest(x.numpy(), truncnorm(lo, hi).cdf).pvalue > 0.01
    # far tail: stays inside, piles up at the near wall with mean ≈ lo + 1/lo
    x = truncated_normal(m, torch.tensor(1.0), torch.tensor(40.0), torch.tensor(41.0), g)
    assert bool(((x >= 40) & (x <= 41)).all()) and abs(float(x.mean()) - 40.025) < 0.003


def test_forward_at_t1_is_uniform_over_box() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(1000, 4, frac_xy=(0.2, 0.3), z_rel=sum(BOX) / 2)  # 4000 atoms on one point
    g = torch.Generator().manual_seed(0)
    xt, _ = process.perturb(batch, torch.ones(batch.n_structures), g)
    m = batch.movable
    f = frac_coords(xt)[m]
    zb = xt.z_bounds[xt.batch][m]
    zr = (xt.positions[m, 2] - zb[:, 0]) / (zb[:, 1] - zb[:, 0])
    for sample in (f[:, 0], f[:, 1], zr):
        assert kstest(sample.numpy(), "uniform").pvalue > 0.01
    prior = process.sample_prior(batch, g)
    fp = frac_coords(prior)[m]
    assert kstest(fp[:, 0].numpy(), "uniform").pvalue > 0.01


def test_perturb_keeps_masked_atoms_and_box() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(8, 3, seed=2)
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(0.01, 1.0, 8)
    xt, eps = process.perturb(batch, t, g)
    m = batch.movable
    assert torch.equal(xt.positions[~m], batch.positions[~m])
    assert torch.equal(eps[~m], torch.zeros_like(eps[~m]))
    zb = xt.z_bounds[xt.batch]
    assert bool(((xt.positions[m, 2] >= zb[m, 0]) & (xt.positions[m, 2] <= zb[m, 1])).all())
    f = frac_coords(xt)[m]
    assert bool(((f > -1e-5) & (f < 1)).all())


def test_wrap_into_cell() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(3, 5, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    shift = torch.randn(batch.n_atoms, 3, generator=g, dtype=torch.float64) * 30
    shift[:, 2] = 0
    moved = batch.with_positions(batch.positions + shift)
    wrapped = process.wrap(moved)
    m = batch.movable
    f = frac_coords(wrapped)[m]
    assert bool(((f >= -1e-12) & (f < 1)).all())
    # same point modulo the lattice, and masked atoms untouched
    df = frac_coords(wrapped)[m] - frac_coords(moved)[m]
    assert torch.allclose(df, df.round(), atol=1e-9)
    assert torch.equal(wrapped.positions[~m], moved.positions[~m])
    assert torch.equal(wrapped.positions[:, 2], moved.positions[:, 2])
    # float round-off: a tiny negative fractional coordinate must not wrap to exactly 1
    tiny = batch.with_positions(batch.positions.clone())
    tiny.positions[m, :2] = -1e-18
    assert bool((frac_coords(process.wrap(tiny))[m] < 1).all())


def test_eps_target_is_minimum_image_displacement_for_small_sigma() -> None:
    process = SurfaceDiffusion(VPSchedule())
    # atoms sit right at the cell corner: most noisy copies wrap to the far side of the cell
    batch = make_batch(50, 4, frac_xy=(0.999, 0.001), z_rel=4.0, dtype=torch.float64)
    t = torch.full((batch.n_structures,), 0.005, dtype=torch.float64)
    xt, eps = process.perturb(batch, t, torch.Generator().manual_seed(4))
    m = batch.movable
    s = process.std(0.005)
    geo = SlabGeometry.from_batch(batch)
    raw = xt.positions[m, :2] - batch.positions[m, :2]
    assert float(raw.abs().max()) > 2.0  # wrapping really happened
    mic = minimum_image(raw, geo.lattice[m], geo.inv_lattice[m])
    assert float(mic.abs().max()) < 0.5
    assert torch.allclose(eps[m, :2], mic / s, atol=1e-6)
    mean_z = geo.z_center[m] + process.schedule.alpha(0.005) * (batch.positions[m, 2] - geo.z_center[m])
    assert torch.allclose(eps[m, 2], (xt.positions[m, 2] - mean_z) / s, atol=1e-6)
    # and score <-> eps round trip
    score = process.eps_to_score(eps, xt, t)
    assert torch.allclose(process.score_to_eps(score, xt, t), eps)


@pytest.mark.parametrize("std", [0.5, 3.0, 4.5, 8.0])  # real-space and reciprocal-space branches
def test_wrapped_normal_score_is_gradient_of_lattice_sum(std: float) -> None:
    batch = make_batch(1, 6, seed=5, dtype=torch.float64)  # hexagonal 2x2 Cu(111): plane spacing 4.4 Å
    geo = SlabGeometry.from_batch(batch)
    lat, inv = geo.lattice, geo.inv_lattice
    d = torch.randn(batch.n_atoms, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 4
    var = torch.full((batch.n_atoms,), std**2, dtype=torch.float64)

    def log_density(x: torch.Tensor) -> torch.Tensor:
        k = torch.cartesian_prod(*(torch.arange(-30, 31, dtype=torch.float64),) * 2)
        disp = x[:, None, :] + torch.einsum("ki,nij->nkj", k, lat)
        return torch.logsumexp(-(disp**2).sum(-1) / (2 * var[:, None]), dim=-1)

    x = d.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(x).sum(), x)
    score = wrapped_normal_score(d, var, lat, inv)
    assert torch.allclose(score, grad, atol=1e-6 / std, rtol=1e-5)
    if std == 0.5:  # narrow and well inside the Voronoi cell: the minimum-image Gaussian score
        near = 0.3 * geo.minimum_image(d)
        far_image = near + lat[:, 0] - 2 * lat[:, 1]
        assert torch.allclose(wrapped_normal_score(far_image, var, lat, inv), -near / std**2, atol=1e-6)
    if std == 8.0:  # broad: nearly uniform on the torus, the score vanishes (minimum image would not)
        assert float(score.abs().max()) < 1e-10


def test_dsm_loss_uses_movable_atoms_only() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(4, 2, seed=6)
    t = process.sample_time(batch.n_structures, generator=torch.Generator().manual_seed(6))
    assert bool(((t >= process.t_min) & (t <= 1)).all())
    _, target = process.perturb(batch, t, torch.Generator().manual_seed(6))
    pred = target + 0.1
    pred[~batch.movable] = 1e6  # anything on masked atoms is ignored
    loss = process.dsm_loss(pred, target, batch)
    assert math.isclose(float(loss), 3 * 0.01, rel_tol=1e-4)


# --------------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("name", ["em", "ode", "ddim", "pc", "ffc"])
def test_samplers_keep_box_mask_and_cell(name: str) -> None:
    """An adversarial model (pushes everything up and sideways, huge forces) must not escape the box."""
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(6, 4, seed=7)
    x = process.sample_prior(batch, torch.Generator().manual_seed(7))
    m = batch.movable
    zb = batch.z_bounds[batch.batch]

    def model(b: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput:
        push = torch.tensor([3.0, -2.0, -5.0]).expand(b.n_atoms, 3)
        eps = torch.where(m[:, None], push, torch.zeros(1))
        forces = torch.where(m[:, None], torch.tensor([0.0, 0.0, -500.0]).expand(b.n_atoms, 3), torch.zeros(1))
        return DenoiserOutput(eps=eps, forces=forces if with_forces else None)

    seen: list[float] = []

    def callback(i: int, t: float, b: SlabBatch) -> None:
        seen.append(t)
        z = b.positions[m, 2]
        assert bool(((z >= zb[m, 0]) & (z <= zb[m, 1])).all()), f"left the box at step {i}"
        f = frac_coords(b)[m]
        assert bool(((f > -1e-5) & (f < 1)).all())
        assert torch.equal(b.positions[~m], batch.positions[~m])

    out = SAMPLERS[name](
        model,
        x,
        process,
        steps=20,
        guidance=ForceFieldGuidance(0.01),
        callback=callback,
        generator=torch.Generator().manual_seed(8),
    )
    assert len(seen) == 20 and math.isclose(seen[-1], process.t_min) and seen == sorted(seen, reverse=True)
    assert torch.equal(out.positions[~m], batch.positions[~m])


# Data mid-box, and 0.8 Å (2.7 std) above the bottom wall, where the truncation shapes the marginals.
# Near the wall both samplers carry a small z-spread bias (~5-7 %): the truncated kernel's flow needs
# more than the first moment (eps) of the posterior, see SurfaceDiffusion.z_flow_velocity.
Z_PLACES = {"mid": sum(BOX) / 2, "wall": BOX[0] + 0.8}
Z_RTOL = {"mid": 0.07, "wall": 0.12}


def check_recovered(out: SlabBatch, batch: SlabBatch, mu: torch.Tensor, place: str, rtol_xy: float = 0.07) -> None:
    mean, std = wrapped_stats(out, mu)
    assert float(mean.abs().max()) < 0.05, mean
    assert torch.allclose(std[:2], torch.full_like(std[:2], 0.3), rtol=rtol_xy), std
    assert abs(float(std[2]) / 0.3 - 1) < Z_RTOL[place], std
    assert torch.equal(out.positions[~batch.movable], batch.positions[~batch.movable])


@pytest.mark.slow
@pytest.mark.parametrize("place", Z_PLACES)
def test_em_recovers_gaussian_data(place: str) -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(500, Z_PLACES[place])
    model = GaussianData(process, mu, s=0.3, s_z=0.3, exact_z=True)
    x = process.sample_prior(batch, torch.Generator().manual_seed(9))
    out = euler_maruyama(model, x, process, steps=300, generator=torch.Generator().manual_seed(10))
    check_recovered(out, batch, mu, place)
    assert model.calls == 300


@pytest.mark.slow
@pytest.mark.parametrize("place", Z_PLACES)
def test_ode_recovers_gaussian_data(place: str) -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(800, Z_PLACES[place])
    model = GaussianData(process, mu, s=0.3, s_z=0.3, exact_z=True)
    x = process.sample_prior(batch, torch.Generator().manual_seed(11))
    pvalues: dict[float, float] = {}

    def callback(i: int, t: float, b: SlabBatch) -> None:
        # the deterministic flow transports the exact (truncated) z marginals, walls included
        if i in (9, 29, 59):
            pvalues[t] = kstest(z_mixture_cdf(process, b, mu, 0.3, t), "uniform").pvalue

    out = probability_flow_ode(model, x, process, steps=100, callback=callback)
    check_recovered(out, batch, mu, place)
    assert len(pvalues) == 3 and min(pvalues.values()) > 0.01, pvalues
    assert model.calls == 200  # Heun: two evaluations per step


@pytest.mark.slow
@pytest.mark.parametrize("place", Z_PLACES)
def test_ddim_recovers_gaussian_data(place: str) -> None:
    """100 evaluations give back the data's mean and spread, walls included. DDIM is Euler in σ, first
    order: in-plane, where the wrapped kernel turns from uniform to peaked within a few steps, it keeps a
    spread bias of ~10 % at 100 steps (shrinking with more steps), where EM needs 300 for ~5 %."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(400, Z_PLACES[place])
    model = GaussianData(process, mu, s=0.3, s_z=0.3, exact_z=True)
    x = process.sample_prior(batch, torch.Generator().manual_seed(12))
    spread = {}
    for steps in (20, 100):
        out = ddim(model, x, process, steps=steps)
        spread[steps] = float((wrapped_stats(out, mu)[1][:2] / 0.3 - 1).abs().max())
    check_recovered(out, batch, mu, place, rtol_xy=0.13)
    assert spread[100] < 0.5 * spread[20], spread
    assert model.calls == 120


def test_quantile_map_carries_quantiles_between_truncated_kernels() -> None:
    lo, hi = torch.tensor([0.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)
    m_t, m_s = torch.tensor([1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    dist_t = truncnorm((0.0 - 1.0) / 2.0, (5.0 - 1.0) / 2.0, loc=1.0, scale=2.0)
    dist_s = truncnorm((0.0 - 3.0) / 0.5, (5.0 - 3.0) / 0.5, loc=3.0, scale=0.5)
    for q in (0.01, 0.3, 0.5, 0.9, 0.999):
        z = torch.tensor([dist_t.ppf(q)], dtype=torch.float64)
        mapped = _quantile_map(z, m_t, 2.0, m_s, 0.5, lo, hi)
        assert math.isclose(float(mapped), dist_s.ppf(q), abs_tol=1e-6), q
    # the walls map onto the walls; far outside both kernels it stays inside the box
    ends = _quantile_map(torch.tensor([0.0, 5.0], dtype=torch.float64), m_t.expand(2), 2.0, m_s.expand(2), 0.5,
                         lo.expand(2), hi.expand(2))
    assert torch.allclose(ends, torch.tensor([0.0, 5.0], dtype=torch.float64), atol=1e-6)
    far = _quantile_map(torch.tensor([4.0], dtype=torch.float64), torch.tensor([-60.0], dtype=torch.float64), 0.1,
                        torch.tensor([-70.0], dtype=torch.float64), 0.1, lo, hi)
    assert 0.0 <= float(far) <= 5.0


@pytest.mark.slow
def test_force_field_guidance_lowers_energy() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(200)
    x_star = mu + torch.tensor([1.0, 0.0, 0.5])  # the force field's minimum is off the data mean
    model = GaussianData(process, mu, s=0.3, s_z=0.3, k=5.0, x_star=x_star)
    x = process.sample_prior(batch, torch.Generator().manual_seed(12))
    guide = ForceFieldGuidance(eta_dt=0.005)
    assert isinstance(guide, Guidance) and guide.needs_forces
    runs = {}
    for name, g in [("plain", None), ("zero", ForceFieldGuidance(eta_dt=0.0)), ("guided", guide)]:
        gen = torch.Generator().manual_seed(13)
        runs[name] = euler_maruyama(model, x, process, steps=200, guidance=g, generator=gen)
    energy = {k: harmonic(v, x_star, 5.0)[1] for k, v in runs.items()}
    assert torch.equal(runs["zero"].positions, runs["plain"].positions)  # same seed, same path
    # the analytic data alone give E ≈ ½k(1.25 + 3·0.09) ≈ 3.8 eV; guidance pulls toward x*
    assert float(energy["guided"].mean()) < 0.85 * float(energy["plain"].mean()), energy
    assert float((energy["guided"] < energy["plain"]).float().mean()) > 0.75
    shift = wrapped_stats(runs["guided"], mu)[0] - wrapped_stats(runs["plain"], mu)[0]
    assert float(shift[0]) > 0.05 and float(shift[2]) > 0.02  # toward x* = mu + (1, 0, 0.5)


def test_guidance_displacement_is_eta_dt_per_step() -> None:
    batch = make_batch(2, 2, seed=14)
    forces = torch.randn(batch.n_atoms, 3, generator=torch.Generator().manual_seed(14))
    out = DenoiserOutput(eps=torch.zeros_like(forces), forces=forces)
    t = torch.tensor([0.25, 1.0])
    rate = ForceFieldGuidance(eta_dt=1e-3)(batch, t, out, dt=0.01)
    m = batch.movable
    expected = 1e-3 * (1 - t)[batch.batch, None] * forces
    assert torch.allclose(rate[m] * 0.01, expected[m])
    assert torch.equal(rate[~m], torch.zeros_like(rate[~m]))
    capped = ForceFieldGuidance(eta_dt=1.0, max_displacement=0.05)(batch, t, out, dt=0.01)
    assert float(torch.linalg.norm(capped * 0.01, dim=-1).max()) <= 0.05 + 1e-6


# --------------------------------------------------------------------------------------------------
# relaxation and validity


@pytest.mark.parametrize("method", ["fire", "sd"])
def test_mlff_relax_batched_and_confined(method: str) -> None:
    batch = make_batch(5, 3, seed=15, dtype=torch.float64)
    m = batch.movable
    zb = batch.z_bounds[batch.batch]
    g = torch.Generator().manual_seed(15)
    x_star = batch.positions + torch.randn(batch.n_atoms, 3, generator=g, dtype=torch.float64) * 0.5
    x_star[:, 2] = torch.where(batch.batch == 0, zb[:, 1] + 2.0, (zb[:, 0] + zb[:, 1]) / 2)  # 0: above box
    batch = distinct_cells(batch)
    mlff = HarmonicMLFF(x_star, 5.0, full=batch)
    relaxed, info = mlff_relax(mlff, batch, steps=200, fmax=0.01, method=method, step_size=0.05)
    # converged structures leave the batch: the model sees fewer structures as they converge, never more
    assert mlff.calls[0] == 5 and mlff.calls[-2] == 1 and mlff.calls[:-1] == sorted(mlff.calls[:-1], reverse=True)
    for b in range(1, 5):  # each structure relaxes as it would alone
        alone = batch.select(torch.arange(5) == b)
        one, one_info = mlff_relax(HarmonicMLFF(x_star[batch.batch == b], 5.0), alone, steps=200, fmax=0.01,
                                   method=method, step_size=0.05)
        assert torch.allclose(one.positions, relaxed.positions[batch.batch == b])
        assert int(one_info.steps[0]) == int(info.steps[b])
    assert torch.equal(relaxed.positions[~m], batch.positions[~m])
    z = relaxed.positions[m, 2]
    assert bool(((z >= zb[m, 0]) & (z <= zb[m, 1])).all())
    first = m & (batch.batch == 0)
    assert torch.allclose(relaxed.positions[first, 2], zb[first, 1])  # stopped at the top wall
    assert not bool(info.converged[0]) and bool(info.converged[1:].all())
    assert int(info.steps[0]) == 200 and bool((info.steps[1:] < 200).all())
    geo = SlabGeometry.from_batch(batch)
    d_xy = geo.minimum_image(relaxed.positions[:, :2] - x_star[:, :2])[m]
    assert float(d_xy.abs().max()) < 0.01
    assert info.energy is not None and info.energy.shape == (5,)


def test_check_validity() -> None:
    batch = make_batch(5, 2, size=(2, 2, 1), frac_xy=(0.25, 0.25), z_rel=3.0, dtype=torch.float64)
    pos = batch.positions.clone()
    zb = batch.z_bounds.clone()
    over = batch.movable.nonzero().squeeze(1).view(5, 2)
    a1 = batch.cell[0, 0]
    pos[over[:, 1]] += 0.5 * a1  # well separated by default
    # 1: overlayer pair 0.6 Å apart through the periodic boundary along a1
    pos[over[1, 0]] = torch.tensor([0.1, 2.0, pos[over[1, 0], 2]], dtype=torch.float64)
    pos[over[1, 1]] = pos[over[1, 0]] + a1 - torch.tensor([0.6, 0, 0], dtype=torch.float64)
    # 2: overlayer atom 0.5 Å above a substrate atom (box widened so only the distance is wrong)
    sub = (batch.batch == 2) & ~batch.movable
    top_atom = sub.nonzero()[0, 0]
    pos[over[2, 0]] = pos[top_atom] + torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    zb[2, 0] = pos[top_atom, 2]
    # 3: movable atom above the box; 4: NaN
    pos[over[3, 0], 2] = zb[3, 1] + 0.2
    pos[over[4, 1]] = float("nan")
    from dataclasses import replace

    valid, reasons = check_validity(replace(batch, positions=pos, z_bounds=zb))
    assert valid.tolist() == [True, False, False, False, False]
    assert reasons[0] == ""
    assert "closer than" in reasons[1] and "0.600" in reasons[1]
    assert "closer than" in reasons[2] and "outside" not in reasons[2]
    assert "outside the z box" in reasons[3] and "closer" not in reasons[3]
    assert "non-finite" in reasons[4]


def test_select_keeps_structures_in_order_and_refuses_wrong_masks() -> None:
    batch = make_batch(4, 2, seed=16)
    keep = torch.tensor([False, True, False, True])
    sub = batch.select(keep)
    assert sub.n_structures == 2 and torch.equal(sub.batch.unique(), torch.tensor([0, 1]))
    for new, old in [(0, 1), (1, 3)]:
        assert torch.equal(sub.positions[sub.batch == new], batch.positions[batch.batch == old])
        assert torch.equal(sub.movable[sub.batch == new], batch.movable[batch.batch == old])
    assert torch.equal(sub.z_bounds, batch.z_bounds[keep])
    with pytest.raises(ValueError, match="bool mask"):
        batch.select(torch.tensor([0, 1]))
