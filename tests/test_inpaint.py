"""Inpainting (RePaint) and seeded exploration: the diffusion layer on analytic models, then the sampling
plumbing (config, sources, documents) on an untrained tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from ase.build import fcc111
from ase.io import write

from surfdiff_core.config import SampleConfig, SampleTarget, config_from_dict
from surfdiff_core.diffusion.inpaint import Known, forward_transition, repaint
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion, wrapped_normal_score
from surfdiff_core.diffusion.samplers import SAMPLERS, euler_maruyama
from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.diffusion.seeded import noise_to, seeded_steps, start_at
from surfdiff_core.errors import ConfigError
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from tests.test_diffusion import BOX, GaussianData, frac_coords, gaussian_setup, make_batch, wrapped_stats

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: threads only add noise


class TwoModes:
    """Two O atoms per structure, in-plane each N(mu_xy, s²); in z the data are two modes, (A low, B high) or
    (A high, B low), ±d around the box centre: knowing A selects B's completion. Exact eps of the perturbed
    mixture (Gaussian convolution in z, fine mid-box)."""

    def __init__(self, process: SurfaceDiffusion, mu: torch.Tensor, s: float = 0.3, d: float = 1.2) -> None:
        self.process, self.mu, self.s, self.d = process, mu, s, d

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput:
        geo = SlabGeometry.from_batch(batch)
        tb = t[batch.batch]
        a, sig = self.process.schedule.alpha(tb), self.process.std(tb)
        pos, m = batch.positions, batch.movable
        score = torch.zeros_like(pos)
        score[:, :2] = wrapped_normal_score(pos[:, :2] - self.mu[:, :2], self.s**2 + sig**2, geo.lattice,
                                            geo.inv_lattice)
        idx = m.nonzero().squeeze(1).view(-1, 2)  # [B, (A, B)]
        v = a[idx] ** 2 * self.s**2 + sig[idx] ** 2
        sign = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # mode 0: A low, B high
        means = geo.z_center[idx][:, None] + a[idx][:, None] * sign[None] * self.d  # [B, mode, atom]
        z = pos[idx, 2][:, None]
        w = torch.softmax(-((z - means) ** 2 / (2 * v[:, None])).sum(-1), dim=-1)
        score[idx, 2] = (w[..., None] * (-(z - means) / v[:, None])).sum(1)
        eps = torch.where(m[:, None], -sig[:, None] * score, torch.zeros_like(score))
        return DenoiserOutput(eps=eps)


def two_mode_setup(n: int):
    batch = make_batch(n, 2, size=(2, 2, 1), frac_xy=(0.5, 0.5), z_rel=sum(BOX) / 2)
    idx = batch.movable.nonzero().squeeze(1).view(-1, 2)
    zc = SlabGeometry.from_batch(batch).z_center[idx]
    return batch, batch.positions.clone(), idx, zc


# --------------------------------------------------------------------------------------------------
# diffusion layer


def test_forward_transition_composes_to_the_kernel() -> None:
    """q(x_t | x_s) after q(x_s | x0) has the spread of q(x_t | x0), in-plane and in z (mid-box)."""
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(4000, 1, size=(4, 4, 1), frac_xy=(0.5, 0.5), z_rel=sum(BOX) / 2, dtype=torch.float64)
    geo = process.geometry(batch)
    g = torch.Generator().manual_seed(0)
    xs = forward_transition(process, geo, batch.positions, 0.0, 0.02, g)
    xt = forward_transition(process, geo, xs, 0.02, 0.05, g)
    m = batch.movable
    std = (xt[m] - batch.positions[m]).std(0)
    assert torch.allclose(std, torch.full((3,), process.std(0.05), dtype=torch.float64), rtol=0.05), std
    assert torch.equal(xt[~m], batch.positions[~m])


def test_repaint_keeps_fixed_atoms_to_the_bit_and_the_box() -> None:
    process = SurfaceDiffusion(VPSchedule())
    batch = make_batch(8, 3, seed=3)
    model = GaussianData(process, batch.positions.clone(), s=0.3, s_z=0.3)
    over = batch.movable.nonzero().squeeze(1).view(8, 3)
    mask = torch.zeros_like(batch.movable)
    mask[over[:, 0]] = True
    known = Known(batch.positions.clone(), mask)
    m, zb = batch.movable, batch.z_bounds[batch.batch]

    def callback(i: int, t: float, b: SlabBatch) -> None:
        z = b.positions[m, 2]
        assert bool(((z >= zb[m, 0]) & (z <= zb[m, 1])).all())
        f = frac_coords(b)[m]
        assert bool(((f > -1e-5) & (f < 1)).all())
        assert torch.equal(b.positions[~m], batch.positions[~m])

    x = process.sample_prior(batch, torch.Generator().manual_seed(4))
    out = repaint(model, x, process, steps=20, callback=callback, generator=torch.Generator().manual_seed(5),
                  known=known, resample=2)
    assert torch.equal(out.positions[mask], batch.positions[mask])
    assert torch.equal(out.positions[~m], batch.positions[~m])
    assert not torch.equal(out.positions[m & ~mask], x.positions[m & ~mask])
    with pytest.raises(ValueError, match="movable"):
        repaint(model, x, process, steps=2, known=Known(batch.positions, ~m))


@pytest.mark.slow
def test_repaint_completes_the_fixed_half_with_its_mode() -> None:
    """Free sampling draws both modes; with A fixed low, B comes out high (the one low-energy completion) in
    nearly every sample, with the data's spread once RePaint resamples."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu, idx, zc = two_mode_setup(300)
    model = TwoModes(process, mu)
    x = process.sample_prior(batch, torch.Generator().manual_seed(1))
    free = euler_maruyama(model, x, process, steps=100, generator=torch.Generator().manual_seed(2))
    high = float((free.positions[idx[:, 1], 2] > zc[:, 1]).float().mean())
    assert 0.35 < high < 0.65, high
    known_pos = mu.clone()
    known_pos[idx[:, 0], 2] = zc[:, 0] - 1.2
    mask = torch.zeros_like(batch.movable)
    mask[idx[:, 0]] = True
    frac = {}
    for r in (1, 3):
        out = repaint(model, x, process, steps=100, generator=torch.Generator().manual_seed(2),
                      known=Known(known_pos, mask), resample=r)
        assert torch.equal(out.positions[mask], known_pos[mask])
        zb = out.positions[idx[:, 1], 2] - zc[:, 1]
        frac[r] = float((zb > 0).float().mean())
    assert frac[1] > 0.9 and frac[3] > 0.97, frac
    assert abs(float(zb.mean()) - 1.2) < 0.1 and abs(float(zb.std()) / 0.3 - 1) < 0.15, (zb.mean(), zb.std())


@pytest.mark.slow
def test_seeded_exploration_spreads_with_t0() -> None:
    """From a seed off the data: t0 → 0 returns the seed, larger t0 moves further toward the data (monotone),
    for every diffusion sampler; masked atoms never move."""
    process = SurfaceDiffusion(VPSchedule())
    batch, mu = gaussian_setup(200)
    model = GaussianData(process, mu, s=0.3, s_z=0.3)
    seed = batch.with_positions(torch.where(batch.movable[:, None], mu + torch.tensor([0.8, 0.0, 0.4]), mu))
    m = batch.movable
    for name in ("em", "ddim", "pc"):
        moved = []
        for t0 in (0.002, 0.02, 0.1, 0.4):
            g = torch.Generator().manual_seed(3)
            x = noise_to(process, seed, t0, g)
            out = SAMPLERS[name](model, x, start_at(process, t0), steps=seeded_steps(200, t0, process.t_min),
                                 generator=g)
            assert torch.equal(out.positions[~m], batch.positions[~m])
            mean, _ = wrapped_stats(out, seed.positions)
            moved.append(float(mean.norm()))
        assert moved[0] < 0.05, (name, moved)  # pc: its Langevin step at t_min already mixes toward the data
        # monotone up to sampling noise once it has reached the data mean, 0.89 Å away
        assert all(b > a - 0.02 for a, b in zip(moved, moved[1:], strict=False)) and moved[-1] > 0.8, (name, moved)
        assert moved[1] > moved[0] + 0.1 and moved[2] > moved[1] + 0.1, (name, moved)


def test_start_at_grid_and_steps() -> None:
    process = SurfaceDiffusion(VPSchedule())
    seeded = start_at(process, 0.3)
    ts = seeded.time_grid(10)
    assert ts[0] == pytest.approx(0.3) and ts[-1] == pytest.approx(process.t_min) and ts == sorted(ts, reverse=True)
    assert seeded.time_grid(10, 2.0)[0] == pytest.approx(0.3)
    assert seeded_steps(500, 0.3, process.t_min) == 150 and seeded_steps(500, 1.0, process.t_min) == 500
    with pytest.raises(ValueError, match="t0"):
        start_at(process, 0.0005)


# --------------------------------------------------------------------------------------------------
# sampling plumbing: sources, selections, documents


def tiny_study():
    """The tiny test study's config, its Ag2O2 p(2x2) target and an untrained model of it (plumbing only)."""
    from surfdiff_core.stages.common import target_system
    from surfdiff_core.train.checkpoint import LoadedModel
    from surfdiff_core.train.trainer import make_model, make_process
    from tests.conftest import TINY_CONFIG

    cfg = config_from_dict(yaml.safe_load(TINY_CONFIG.replace("STORE", "unused")))
    system = target_system(cfg, SampleTarget(cell="p(2x2)", composition="Ag2O2"))
    torch.manual_seed(0)
    loaded = LoadedModel(make_model(cfg.model, [8, 47]), make_process(cfg.model), "m-untrained", {})
    return cfg, system, loaded


@pytest.fixture(scope="module")
def tiny():
    return tiny_study()


def _scfg(cfg, **update) -> SampleConfig:
    return SampleConfig.model_validate({**cfg.sample.model_dump(), "n": 4, "batch_size": 4, "steps": 8, **update})


def test_inpainted_samples_keep_fixed_atoms_exactly(tiny, tmp_path) -> None:
    from surfdiff_core.sample.generate import generate, generated_doc_id, sample_into_store
    from surfdiff_core.store import open_store

    cfg, system, loaded = tiny
    src = system.random_structure(np.random.default_rng(0))
    write(tmp_path / "src.extxyz", src)
    from ase.io import read

    given = read(tmp_path / "src.extxyz").positions
    scfg = _scfg(cfg, inpaint={"source": str(tmp_path / "src.extxyz"), "elements": ["O"], "resample": 2})
    res = generate(loaded, system, scfg, progress=False)
    n = system.n_substrate
    for pos in res.positions:
        assert np.array_equal(pos[n + 2:], given[n + 2:])  # the two O atoms, bit for bit, after the relaxation
        assert not np.allclose(pos[n:n + 2], given[n:n + 2])  # the Ag atoms are generated
        z = pos[n:, 2]
        assert np.all((z >= system.z_box[0] - 1e-6) & (z <= system.z_box[1] + 1e-6))
    assert res.conditioning["inpaint"]["fixed_indices"] == [n + 2, n + 3]
    assert res.conditioning["inpaint"]["fixed"] == "O2"

    with open_store(cfg.store.model_copy(update={"backend": "memory"})) as store:
        _, docs = sample_into_store(store, loaded, system, scfg, progress=False)
        assert len(docs) == 4 and docs[0].meta["inpaint"]["resample"] == 2
        assert np.allclose(docs[0].to_atoms().positions[n + 2:], given[n + 2:], atol=1e-9)
        # a store document works as a source too, and the ids follow the inpainting settings
        by_doc = _scfg(cfg, inpaint={"source": docs[0].doc_id, "indices": [0]})
        _, again = sample_into_store(store, loaded, system, by_doc, progress=False)
        assert np.allclose(again[0].to_atoms().positions[n], docs[0].to_atoms().positions[n], atol=1e-9)
    ids = {generated_doc_id("m", system, s, 0, 0) for s in
           (_scfg(cfg), scfg, _scfg(cfg, inpaint={**scfg.inpaint.model_dump(), "resample": 3}), by_doc)}
    assert len(ids) == 4
    assert generated_doc_id("m", system, _scfg(cfg, sampler="em"), 0, 0) == generated_doc_id("m", system, _scfg(cfg),
                                                                                            0, 0)


def test_seeded_samples_stay_near_a_seed_at_small_t0(tiny, tmp_path) -> None:
    from surfdiff_core.sample.generate import generate

    cfg, system, loaded = tiny
    src = system.random_structure(np.random.default_rng(1))
    write(tmp_path / "seed.extxyz", src)
    n = system.n_substrate
    dist = {}
    for t0 in (0.002, 0.5):
        scfg = _scfg(cfg, seed_structure=str(tmp_path / "seed.extxyz"), t0=t0, relax=False, guidance=False,
                     repulsion=0.0)
        res = generate(loaded, system, scfg, progress=False)
        assert res.conditioning["seed_structure"]["t0"] == t0
        d = np.stack([p[n:] - src.positions[n:] for p in res.positions])
        d[..., :2] -= np.round(d[..., :2] / 1e3) * 1e3  # cells are wider than any move here
        dist[t0] = float(np.abs(d[..., 2]).mean())
        assert all(np.array_equal(p[:n], res.positions[0][:n]) for p in res.positions)
    # an untrained model: near t_min only the last step's noise (~0.05 Å) and its small drift move the seed
    assert dist[0.002] < 0.15 and dist[0.002] < 0.2 * dist[0.5], dist


def test_bad_sources_are_refused_with_one_line(tiny, tmp_path) -> None:
    from surfdiff_core.sample.conditioning import resolve_conditioning

    cfg, system, _ = tiny
    src = system.random_structure(np.random.default_rng(2))
    write(tmp_path / "src.extxyz", src)
    other = fcc111("Cu", size=(2, 2, 2), vacuum=7.0)
    other.append("O")
    write(tmp_path / "cu.extxyz", other)
    ag1o1 = system.with_composition("Ag1O1")
    cases = [
        (system, {"inpaint": {"source": str(tmp_path / "cu.extxyz")}}, "substrate is not the target's"),
        (ag1o1, {"inpaint": {"source": str(tmp_path / "src.extxyz"), "elements": ["Ag"]}},
         "atoms Ag2 are not in the target composition Ag1O1"),
        (system, {"inpaint": {"source": str(tmp_path / "src.extxyz"), "z_range": [20.0, 30.0]}}, "fixes no atom"),
        (system, {"inpaint": {"source": str(tmp_path / "src.extxyz")}}, "nothing is left to generate"),
        (system, {"inpaint": {"source": str(tmp_path / "src.extxyz"), "indices": [7]}}, "has 4 overlayer atoms"),
        (system, {"inpaint": {"source": str(tmp_path / "missing.xyz")}}, "neither a structure file"),
        (system, {"inpaint": {"source": "relaxed-0123456789abcdef0123"}}, "no document"),
        (ag1o1, {"seed_structure": str(tmp_path / "src.extxyz")}, "is not the target composition Ag1O1"),
    ]
    for target, update, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            resolve_conditioning(_scfg(cfg, **update), target, None)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="sampler em"):
        _scfg(cfg, sampler="ode", inpaint={"source": "x.xyz"})


def test_cli_inpaint_options_name_themselves(tiny) -> None:
    import argparse

    from flows.cli_stages import _inpaint_options

    cfg, _, _ = tiny
    ns = dict(inpaint_from=None, fix=None, fix_z=None, fix_indices=None, resample=None)
    assert _inpaint_options(argparse.Namespace(**ns), cfg.sample) is None
    got = _inpaint_options(argparse.Namespace(**{**ns, "inpaint_from": "a.xyz", "fix": "O, Ag"}), cfg.sample)
    assert got["source"] == "a.xyz" and got["elements"] == ["O", "Ag"] and got["resample"] == 3
    with pytest.raises(ConfigError, match="need --inpaint-from"):
        _inpaint_options(argparse.Namespace(**{**ns, "fix": "O"}), cfg.sample)
    with pytest.raises(ConfigError, match="^--fix-z: .*increasing"):
        _inpaint_options(argparse.Namespace(**{**ns, "inpaint_from": "a.xyz", "fix_z": [3.0, 1.0]}), cfg.sample)
    with pytest.raises(ConfigError, match="^--fix: unknown element"):
        _inpaint_options(argparse.Namespace(**{**ns, "inpaint_from": "a.xyz", "fix": "Qq"}), cfg.sample)
