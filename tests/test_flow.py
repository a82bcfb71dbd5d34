"""Flow matching: straight periodic paths from the box prior, the exact velocity carries the prior onto the data
(a point and a two-point mixture), masked atoms never move, a model trains and samples end to end, and a model
and sampler of different kinds are refused with one line."""

from __future__ import annotations

import pytest
import torch

from surfdiff_core.config import load_config
from surfdiff_core.diffusion.flow import SurfaceFlow, flow_euler
from surfdiff_core.errors import ConfigError
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from tests.conftest import TINY_CONFIG
from tests.test_diffusion import BOX, gaussian_setup, make_batch

FLOW = SurfaceFlow(length_scale=10.0)


def test_path_runs_from_data_to_a_uniform_prior_inside_the_box():
    batch = make_batch(64, 3, seed=1, dtype=torch.float64)
    geo = FLOW.geometry(batch)
    gen = torch.Generator().manual_seed(0)
    at0, target = FLOW.perturb(batch, 0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(at0.positions, geo.confine(batch.positions))
    mov = batch.movable
    assert torch.all(target[~mov] == 0)
    at1, _ = FLOW.perturb(batch, 1.0, generator=torch.Generator().manual_seed(0))
    prior = FLOW.sample_prior(batch, generator=torch.Generator().manual_seed(0)).positions
    torch.testing.assert_close(at1.positions, geo.wrap(prior))  # the end of the path is the prior draw
    x_t, u = FLOW.perturb(batch, torch.rand(64, generator=gen, dtype=torch.float64), generator=gen)
    z = x_t.positions[mov, 2]
    assert torch.all(z >= geo.z_lo[mov] - 1e-9) and torch.all(z <= geo.z_hi[mov] + 1e-9)
    torch.testing.assert_close(x_t.positions[~mov], batch.positions[~mov])
    # in-plane the path takes the shortest image: no step longer than the cell's half diagonal
    half_diag = 0.5 * torch.linalg.norm(batch.cell[0, 0, :2] + batch.cell[0, 1, :2])
    assert float(torch.linalg.norm(u[mov, :2] * FLOW.length_scale, dim=-1).max()) <= float(half_diag) + 1e-6


class ExactVelocity:
    """The posterior-mean velocity E[x1 − x0 | x_t] for data at `points` [K, N, 3] with equal weights, one
    structure layout: in-plane every point shares its xy (Dirac), along z the K candidates are weighted by
    whether the prior end x0 + (x_t − x0)/t lies in the box (the path density is uniform there)."""

    def __init__(self, points: torch.Tensor, geo) -> None:
        self.points, self.geo = points, geo

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool = False) -> DenoiserOutput:
        tt = t[batch.batch][:, None]
        d = torch.stack([FLOW.displacement(p, batch.positions, self.geo) for p in self.points])  # [K, N, 3]
        end_z = self.points[..., 2] + d[..., 2] / tt[:, 0]
        inside = (end_z >= self.geo.z_lo - 1e-9) & (end_z <= self.geo.z_hi + 1e-9)
        w = inside.to(d.dtype)
        w = w / w.sum(0).clamp_min(1e-12)
        u = (w[..., None] * d).sum(0) / tt / FLOW.length_scale
        u = torch.where(batch.movable[:, None], u, torch.zeros_like(u))
        return DenoiserOutput(eps=u)


def test_exact_velocity_carries_the_prior_onto_a_point_across_the_cell_edge():
    batch, x0 = gaussian_setup(200, dtype=torch.float64)  # data near the cell corner: paths wrap
    geo = FLOW.geometry(batch)
    prior = FLOW.sample_prior(batch, generator=torch.Generator().manual_seed(3))
    out = flow_euler(ExactVelocity(x0[None], geo), prior, FLOW, steps=20)
    d = FLOW.displacement(x0, out.positions, geo)
    assert float(d.abs().max()) < 1e-8
    torch.testing.assert_close(out.positions[~batch.movable], batch.positions[~batch.movable])


def test_exact_velocity_recovers_a_two_point_mixture_in_z():
    batch, x0 = gaussian_setup(2000, z_rel=BOX[0] + 1.0, dtype=torch.float64)
    high = x0.clone()
    high[batch.movable, 2] += 4.0  # second mode 4 Å higher, same site
    geo = FLOW.geometry(batch)
    prior = FLOW.sample_prior(batch, generator=torch.Generator().manual_seed(4))
    out = flow_euler(ExactVelocity(torch.stack([x0, high]), geo), prior, FLOW, steps=200)
    z = out.positions[batch.movable, 2]
    at_low = (z - x0[batch.movable, 2]).abs() < 0.05
    at_high = (z - high[batch.movable, 2]).abs() < 0.05
    assert bool((at_low | at_high).all())
    assert abs(float(at_low.double().mean()) - 0.5) < 0.04  # 2000 draws: 3.6 standard errors


def test_mismatched_sampler_and_model_kind_is_one_clear_error(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "store"))
                    .replace("time_features: 8}", "time_features: 8, generative: flow}"))
    with pytest.raises(ConfigError, match="does not fit model.generative 'flow'"):
        load_config(path)


def test_a_flow_model_trains_samples_and_refuses_diffusion_samplers(tmp_path):
    from surfdiff_core.sample.generate import generate
    from surfdiff_core.stages import rss, sample, train
    from surfdiff_core.stages.common import open_study_store, target_system
    from surfdiff_core.train.checkpoint import load_checkpoint

    path = tmp_path / "flow.yaml"
    text = TINY_CONFIG.replace("STORE", str(tmp_path / "store"))
    text = text.replace("time_features: 8}", "time_features: 8, generative: flow}")
    path.write_text(text.replace("  steps: 10\n", "  steps: 10\n  sampler: flow\n"))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        loaded = load_checkpoint(model.checkpoint)
        assert isinstance(loaded.process, SurfaceFlow)
        assert loaded.meta["history"][-1]["train_score"] > 0  # the velocity loss was trained
        drawn = sample.run(cfg, store, model, progress=False)
        docs = list(store.find({"doc_id": {"$in": drawn.targets[0].doc_ids}}))
        assert len(docs) == cfg.sample.n and all(d.meta["sampler"] == "flow" and d.in_box for d in docs)
        system = target_system(cfg, cfg.sample.targets[0])
        with pytest.raises(ConfigError, match="is a flow-matching model"):
            generate(loaded, system, cfg.sample.model_copy(update={"sampler": "em"}), progress=False)
