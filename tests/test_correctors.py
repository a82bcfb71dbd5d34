"""Predictor–corrector samplers (diffusion/correctors.py) on the analytic models of test_diffusion.py."""

from __future__ import annotations

import pytest
import torch

from surfdiff_core.diffusion.correctors import (
    force_field_corrector,
    langevin_step,
    predictor_corrector,
    reflect,
)
from surfdiff_core.diffusion.process import SurfaceDiffusion
from surfdiff_core.diffusion.samplers import SAMPLERS, euler_maruyama
from surfdiff_core.diffusion.schedule import VPSchedule
from tests.test_diffusion import (
    BOX,
    Z_PLACES,
    GaussianData,
    check_recovered,
    gaussian_setup,
    harmonic,
    make_batch,
    wrapped_stats,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: threads only add noise


def spread_error(out, mu) -> float:
    """Largest relative error of the per-axis std against the data's 0.3 Å."""
    return float((wrapped_stats(out, mu)[1] / 0.3 - 1).abs().max())


def multi_atom_setup(n_struct: int, n_over: int = 8):
    """n_over O atoms per structure, each an independent N(mu, 0.3²) mid-box near the cell corner."""
    batch = make_batch(n_struct, n_over, size=(2, 2, 1), frac_xy=(0.95, 0.9), z_rel=sum(BOX) / 2)
    return batch, batch.positions.clone()


def test_reflect_folds_into_the_box() -> None:
    lo, hi = torch.tensor(1.0), torch.tensor(3.0)
    z = torch.tensor([0.5, 1.0, 2.0, 3.4, 5.5, -3.5, 3.0])
    assert torch.allclose(reflect(z, lo, hi), torch.tensor([1.5, 1.0, 2.0, 2.6, 1.5, 1.5, 3.0]))


def test_registered_and_masked_atoms_bit_for_bit() -> None:
    assert SAMPLERS["pc"] is predictor_corrector and SAMPLERS["ffc"] is force_field_corrector
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = multi_atom_setup(6, 3)
    model = GaussianData(process, mu, s=0.3, s_z=0.3, k=5.0)
    x = process.sample_prior(batch, torch.Generator().manual_seed(1))
    m = batch.movable
    for name in ("pc", "ffc"):
        out = SAMPLERS[name](model, x, process, steps=10, generator=torch.Generator().manual_seed(2))
        assert torch.equal(out.positions[~m], batch.positions[~m])
        assert not torch.equal(out.positions[m], x.positions[m])


def test_langevin_corrector_keeps_the_marginal_stationary() -> None:
    """Started from exact samples of p_t, many corrector steps leave mean and spread where they are (the batch
    step size; a per-structure ε(x) ∝ 1/‖s(x)‖² inflated the spread by ~10 % here)."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = multi_atom_setup(300)
    model = GaussianData(process, mu, s=0.3, s_z=0.3)
    g = torch.Generator().manual_seed(3)
    x0 = batch.with_positions(torch.where(batch.movable[:, None], mu + 0.3 * torch.randn(mu.shape, generator=g), mu))
    geo = process.geometry(batch)
    for t in (process.t_min, 0.02):
        xt, _ = process.perturb(x0, t, g)
        std = (0.09 + process.std(t) ** 2) ** 0.5
        pos = xt.positions
        for _ in range(40):
            pos = langevin_step(model, batch, pos, t, 0.01, process, geo, None, g, snr=0.16)
        mean, spread = wrapped_stats(batch.with_positions(pos), mu)
        assert float(mean.abs().max()) < 0.02, (t, mean)
        assert float((spread / std - 1).abs().max()) < 0.04, (t, spread / std)
        assert torch.equal(pos[~batch.movable], batch.positions[~batch.movable])


@pytest.mark.slow
@pytest.mark.parametrize("place", Z_PLACES)
def test_pc_recovers_gaussian_data(place: str) -> None:
    """150 predictor + 150 corrector evaluations give back the data's mean and spread, walls included."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(500, Z_PLACES[place])
    model = GaussianData(process, mu, s=0.3, s_z=0.3, exact_z=True)
    x = process.sample_prior(batch, torch.Generator().manual_seed(9))
    out = predictor_corrector(model, x, process, steps=150, generator=torch.Generator().manual_seed(10))
    check_recovered(out, batch, mu, place)
    assert model.calls == 300


@pytest.mark.slow
def test_corrector_improves_em_at_equal_predictor_steps() -> None:
    """At few steps EM over-disperses (its last, large steps add too much noise); Langevin corrector steps
    pull the spread back toward the data's. Measured on this toy (8-atom structures, spread error):
    steps 50 → EM 0.35, PC 0.33 (snr 0.16), 0.28 (snr 0.3); but EM with 100 steps (the PC's evaluation
    count) reaches 0.10: at equal evaluations the corrector does not pay here."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = multi_atom_setup(150)
    model = GaussianData(process, mu, s=0.3, s_z=0.3)
    x = process.sample_prior(batch, torch.Generator().manual_seed(4))
    em = euler_maruyama(model, x, process, steps=50, generator=torch.Generator().manual_seed(5))
    pc = predictor_corrector(model, x, process, steps=50, generator=torch.Generator().manual_seed(5), snr=0.3)
    assert spread_error(pc, mu) < spread_error(em, mu) - 0.03, (spread_error(pc, mu), spread_error(em, mu))
    assert float(wrapped_stats(pc, mu)[0].abs().max()) < 0.05


@pytest.mark.slow
def test_force_field_corrector_keeps_the_data_and_lowers_energy() -> None:
    """A weak force field at the data mean leaves the sampled distribution within tolerance; an offset one
    pulls the final structures toward its minimum, more than EM given the same model evaluations."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(400)
    x = process.sample_prior(batch, torch.Generator().manual_seed(6))
    weak = GaussianData(process, mu, s=0.3, s_z=0.3, k=0.5)
    out = force_field_corrector(weak, x, process, steps=200, generator=torch.Generator().manual_seed(7),
                                corrector_steps=1, t_max=0.1, step=0.01)
    check_recovered(out, batch, mu, "mid")
    assert weak.calls == 200 + 20  # one force step after each of the 20 predictor steps with t <= 0.1

    x_star = mu + torch.tensor([0.6, 0.0, 0.3])
    model = GaussianData(process, mu, s=0.3, s_z=0.3, k=5.0, x_star=x_star)
    ffc = force_field_corrector(model, x, process, steps=200, generator=torch.Generator().manual_seed(7),
                                corrector_steps=2, t_max=0.1, step=0.01)
    em = euler_maruyama(model, x, process, steps=240, generator=torch.Generator().manual_seed(7))
    e_ffc, e_em = harmonic(ffc, x_star, 5.0)[1], harmonic(em, x_star, 5.0)[1]
    assert float(e_ffc.mean()) < 0.8 * float(e_em.mean()), (float(e_ffc.mean()), float(e_em.mean()))
    assert torch.equal(ffc.positions[~batch.movable], batch.positions[~batch.movable])
