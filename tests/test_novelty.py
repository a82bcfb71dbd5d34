"""Novelty guidance (diffusion/novelty.py): the descriptor's invariances, and more distinct minima on a toy whose
minima are known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from surfdiff_core.diffusion.guidance import ForceFieldGuidance
from surfdiff_core.diffusion.novelty import NoveltyGuidance, PairDescriptor, SumGuidance
from surfdiff_core.diffusion.process import SlabGeometry, SurfaceDiffusion, wrapped_normal_score
from surfdiff_core.diffusion.samplers import euler_maruyama
from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch
from tests.test_diffusion import BOX, make_batch
from tests.test_inpaint import tiny_study

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: threads only add noise


DESC = PairDescriptor(species=(8, 29))


def test_descriptor_is_invariant_to_permutation_and_translations() -> None:
    batch = make_batch(1, 4, seed=1, dtype=torch.float64)
    d0 = DESC(batch)
    assert d0.shape == (1, DESC.size) and torch.allclose(d0.norm(dim=-1), torch.ones(1, dtype=torch.float64))
    over = batch.movable.nonzero().squeeze(1)
    pos = batch.positions.clone()
    pos[over] = pos[over.flip(0)]  # like atoms swapped
    assert torch.allclose(DESC(batch, pos), d0, atol=1e-10)
    pos = batch.positions.clone()
    pos[over[0]] += batch.cell[0, 0] - 2 * batch.cell[0, 1]  # an atom moved by a lattice vector
    assert torch.allclose(DESC(batch, pos), d0, atol=1e-10)
    shift = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)  # the whole slab shifted
    assert torch.allclose(DESC(batch, batch.positions + shift), d0, atol=1e-10)
    moved = batch.positions.clone()
    moved[over[0], 2] += 1.0
    assert float((DESC(batch, moved) - d0).norm()) > 0.15  # a different structure is told apart


def test_novelty_force_is_the_kernel_gradient_and_composes() -> None:
    batch = make_batch(3, 2, seed=2, dtype=torch.float64)
    known = batch.with_positions(batch.positions + 0.2 * batch.movable[:, None])  # minima near each sample
    guide = NoveltyGuidance(DESC, DESC(known.select(torch.tensor([True, False, False]))), strength=0.02,
                            max_displacement=None)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    out = DenoiserOutput(eps=torch.zeros_like(batch.positions))
    rate = guide(batch, t, out, dt=0.01)
    h, k = 1e-6, int(batch.movable.nonzero()[0])
    plus, minus = batch.positions.clone(), batch.positions.clone()
    plus[k, 2] += h
    minus[k, 2] -= h
    grad = (guide.repulsion(batch, plus) - guide.repulsion(batch, minus)).sum() / (2 * h)
    assert float(rate[k, 2]) == pytest.approx(-0.02 * 0.5 * float(grad) / 0.01, rel=1e-5)
    assert torch.equal(rate[~batch.movable], torch.zeros_like(rate[~batch.movable]))
    ff = ForceFieldGuidance(eta_dt=0.001)
    both = SumGuidance((ff, guide))
    assert both.needs_forces and not guide.needs_forces
    forces = torch.randn(batch.positions.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = replace(out, forces=forces)
    assert torch.allclose(both(batch, t, out, dt=0.01), ff(batch, t, out, dt=0.01) + rate)


class ZModes:
    """One O atom per structure at one in-plane site; in z the data are minima at `heights` above the surface with
    weights `weights` (exact eps of the mixture, Gaussian convolution in z)."""

    def __init__(self, process: SurfaceDiffusion, mu: torch.Tensor, heights, weights, s: float = 0.25) -> None:
        self.process, self.mu, self.s = process, mu, s
        self.h, self.w = torch.tensor(heights), torch.tensor(weights)

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool) -> DenoiserOutput:
        geo = SlabGeometry.from_batch(batch)
        tb = t[batch.batch]
        a, sig = self.process.schedule.alpha(tb), self.process.std(tb)
        pos = batch.positions
        score = torch.zeros_like(pos)
        score[:, :2] = wrapped_normal_score(pos[:, :2] - self.mu[:, :2], self.s**2 + sig**2, geo.lattice,
                                            geo.inv_lattice)
        z0 = (geo.z_lo - BOX[0])[:, None] + self.h[None]
        mean = geo.z_center[:, None] + a[:, None] * (z0 - geo.z_center[:, None])
        v = (a**2 * self.s**2 + sig**2)[:, None]
        r = torch.softmax(torch.log(self.w)[None] - (pos[:, 2:3] - mean) ** 2 / (2 * v), dim=-1)
        score[:, 2] = (r * (-(pos[:, 2:3] - mean) / v)).sum(-1)
        return DenoiserOutput(eps=torch.where(batch.movable[:, None], -sig[:, None] * score, torch.zeros_like(score)))


@pytest.mark.slow
def test_novelty_guidance_reaches_more_distinct_minima() -> None:
    """Three minima, the one already found drawing 80 % of the samples: pushed away from it, samples reach more
    distinct minima per 5 draws, and fewer land in the known one."""
    process = SurfaceDiffusion(VPSchedule())
    heights = [2.5, 3.7, 4.9]
    batch = make_batch(400, 1, size=(2, 2, 1), frac_xy=(0.3, 0.3), z_rel=heights[0])
    model = ZModes(process, batch.positions.clone(), heights, [0.8, 0.1, 0.1])
    minima = DESC(batch.select(torch.arange(400) == 0))  # the known minimum
    top = SlabGeometry.from_batch(batch).z_lo[batch.movable] - BOX[0]
    x = process.sample_prior(batch, torch.Generator().manual_seed(1))
    found = {}
    for strength in (0.0, 0.1):
        guide = NoveltyGuidance(DESC, minima, process=process, strength=strength)
        out = euler_maruyama(model, x, process, steps=200, guidance=guide, generator=torch.Generator().manual_seed(2))
        z = out.positions[batch.movable, 2] - top
        basin = torch.argmin((z[:, None] - torch.tensor(heights)[None]).abs(), dim=-1)  # relaxes into this minimum
        per_five = np.mean([len(set(g.tolist())) for g in basin.view(-1, 5)])
        found[strength] = (per_five, float((basin == 0).float().mean()))
        assert torch.equal(out.positions[~batch.movable], batch.positions[~batch.movable])
    assert found[0.0][1] > 0.75 and found[0.1][1] < found[0.0][1] - 0.1, found
    assert found[0.1][0] > found[0.0][0] + 0.25, found  # measured: 1.81 -> 2.22 distinct minima per 5 samples


def test_novelty_in_sampling_uses_the_study_minima() -> None:
    from surfdiff_core.config import SampleConfig
    from surfdiff_core.sample.generate import generate, generated_doc_id, sample_into_store
    from surfdiff_core.store import StructureDoc, open_store
    from surfdiff_core.store.documents import atoms_to_structure_dict

    cfg, system, loaded = tiny_study()
    scfg = SampleConfig.model_validate({**cfg.sample.model_dump(), "n": 2, "batch_size": 2, "steps": 6,
                                       "novelty": 0.05})
    plain = generate(loaded, system, scfg, progress=False)  # no store: no known minima, nothing to push from
    assert plain.conditioning["novelty"]["minima"] == 0
    with open_store(cfg.store.model_copy(update={"backend": "memory"})) as store:
        rng = np.random.default_rng(0)
        for k in range(3):
            atoms = system.random_structure(rng)
            store.put(StructureDoc(
                doc_id=f"relaxed-{k:020d}", source="relaxed", study=cfg.name, structure=atoms_to_structure_dict(atoms),
                composition=system.composition, formula=atoms.get_chemical_formula(), system_id=system.system_id,
                element=system.element, facet=system.facet, cell=system.cell, n_substrate=system.n_substrate,
                movable=system.movable.tolist(), z_box=list(system.z_box), energy=-float(k)))
        _, docs = sample_into_store(store, loaded, system, scfg, progress=False, study=cfg.name)
        assert docs[0].meta["novelty"]["minima"] == 3 and docs[0].meta["novelty"]["strength"] == 0.05
    off = scfg.model_copy(update={"novelty": 0.0})
    assert generated_doc_id("m", system, off, 0, 0) != generated_doc_id("m", system, scfg, 0, 0)
