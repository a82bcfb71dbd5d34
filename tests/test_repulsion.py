"""The short-range overlap wall: forces are its energy's gradient, it acts only inside r0 and only on movable
atoms, it is invariant under symmetry operations, and it turns collapsed samples into valid ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import fcc111
from ase.data import covalent_radii

from surfdiff_core.diffusion.repulsion import OverlapRepulsion
from surfdiff_core.diffusion.validity import check_validity
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch, collate
from surfdiff_core.relax.mlff import mlff_relax

WALL = OverlapRepulsion(scale=0.75, stiffness=20.0)
R0_AG_O = 0.75 * (covalent_radii[47] + covalent_radii[8])


def slab_with(overlayer: list[tuple[str, tuple[float, float, float]]], size=(3, 3, 2)) -> SlabBatch:
    """Ag(111) with overlayer atoms at the given (fractional x, fractional y, height above the top layer)."""
    slab = fcc111("Ag", size=size, vacuum=8.0, a=4.09)
    top = slab.positions[:, 2].max()
    cell = np.asarray(slab.cell)
    atoms = slab.copy()
    for symbol, (fx, fy, dz) in overlayer:
        atoms.append(symbol)
        atoms.positions[-1] = fx * cell[0] + fy * cell[1] + np.array([0.0, 0.0, top + dz])  # a1, a2 in-plane
    movable = np.r_[np.zeros(len(slab), bool), np.ones(len(overlayer), bool)]
    return collate([atoms], [movable], [(top + 0.5, top + 5.5)], dtype=torch.float64)


def wall_energy(batch: SlabBatch, positions: torch.Tensor) -> float:
    return float(WALL.energy_forces(batch.with_positions(positions))[0].sum())


def test_forces_are_minus_the_energy_gradient() -> None:
    # an Ag-O pair 1.1 Å apart, an O-O pair 0.7 Å apart, both inside their walls
    batch = slab_with([("O", (0.31, 0.42, 2.0)), ("Ag", (0.31, 0.42, 3.1)), ("O", (0.71, 0.2, 2.5)),
                       ("O", (0.71, 0.2, 3.2))])
    energy, forces = WALL.energy_forces(batch)
    assert float(energy.sum()) > 0
    h = 1e-5
    for atom in batch.movable.nonzero().squeeze(1).tolist():
        for c in range(3):
            plus, minus = batch.positions.clone(), batch.positions.clone()
            plus[atom, c] += h
            minus[atom, c] -= h
            numeric = -(wall_energy(batch, plus) - wall_energy(batch, minus)) / (2 * h)
            assert float(forces[atom, c]) == pytest.approx(numeric, abs=1e-5)
    # Newton's third law within the movable pairs: the wall only exchanges momentum between them
    assert torch.allclose(forces[batch.movable].sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_zero_beyond_r0_and_on_masked_atoms() -> None:
    apart = slab_with([("O", (0.1, 0.1, 2.0)), ("O", (0.6, 0.6, 2.0))])
    energy, forces = WALL.energy_forces(apart)
    assert float(energy.sum()) == 0.0 and float(forces.abs().max()) == 0.0
    # an O 1.0 Å above a substrate Ag: the O is pushed up, the (masked) Ag gets nothing
    batch = slab_with([("O", (0.0, 0.0, 1.0))])
    energy, forces = WALL.energy_forces(batch)
    assert float(energy.sum()) == pytest.approx(0.5 * 20.0 * (R0_AG_O - 1.0) ** 2, rel=1e-9)
    assert float(forces[~batch.movable].abs().max()) == 0.0
    assert float(forces[batch.movable][0, 2]) == pytest.approx(20.0 * (R0_AG_O - 1.0), rel=1e-9)


def test_periodic_images_and_invariance() -> None:
    # two O 0.8 Å apart across the cell boundary along a1
    batch = slab_with([("O", (0.02, 0.5, 2.5)), ("O", (0.98, 0.5, 2.5))])
    a1 = float(batch.cell[0, 0, 0])
    gap = 0.04 * a1
    energy, forces = WALL.energy_forces(batch)
    r0 = 0.75 * 2 * covalent_radii[8]
    assert float(energy.sum()) == pytest.approx(0.5 * 20.0 * (r0 - gap) ** 2, rel=1e-6)
    mov = forces[batch.movable]
    assert float(mov[0, 0]) > 0 > float(mov[1, 0])  # pushed apart through the boundary, not across the cell
    # rotation about z (cell rotated with it) and a translation leave the energy unchanged
    rot = torch.tensor([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    moved = SlabBatch(positions=batch.positions @ rot.T + torch.tensor([0.3, -1.2, 0.0], dtype=torch.float64),
                      numbers=batch.numbers, cell=batch.cell @ rot.T, batch=batch.batch, movable=batch.movable,
                      z_bounds=batch.z_bounds)
    e_rot, f_rot = WALL.energy_forces(moved)
    assert torch.allclose(e_rot, energy, atol=1e-9)
    assert torch.allclose(f_rot, forces @ rot.T, atol=1e-9)


class FlatMLFF:
    """An MLFF that has learned nothing about close pairs: zero forces everywhere."""

    def __call__(self, batch: SlabBatch, t: torch.Tensor, *, with_forces: bool = False) -> DenoiserOutput:
        zeros = torch.zeros_like(batch.positions)
        return DenoiserOutput(eps=zeros, forces=zeros if with_forces else None,
                              energy=torch.zeros(batch.n_structures, dtype=batch.positions.dtype))


def test_relaxation_separates_coinciding_atoms() -> None:
    """Collapsed samples (two atoms on one site, as weak denoisers produce) become valid only with the wall."""
    batch = slab_with([("Ag", (0.4, 0.4, 2.5)), ("Ag", (0.4, 0.4, 2.5)), ("O", (0.7, 0.1, 2.0)),
                       ("O", (0.7, 0.1, 2.3))])
    assert not bool(check_validity(batch)[0][0])
    plain, _ = mlff_relax(FlatMLFF(), batch, steps=100)
    assert not bool(check_validity(plain)[0][0])
    walled, info = mlff_relax(WALL.wrap(FlatMLFF()), batch, steps=100)
    assert bool(check_validity(walled)[0][0]), check_validity(walled)[1]
    assert bool(info.converged[0])
    energy, _ = WALL.energy_forces(walled)
    assert float(energy.sum()) < 1e-3  # every pair ended (almost) outside its wall
    assert torch.equal(walled.positions[~batch.movable], batch.positions[~batch.movable])


def test_wrapped_denoiser_keeps_eps_and_adds_to_forces() -> None:
    batch = slab_with([("O", (0.0, 0.0, 1.0))])
    t = torch.zeros(1, dtype=torch.float64)
    out = WALL.wrap(FlatMLFF())(batch, t, with_forces=True)
    energy, forces = WALL.energy_forces(batch)
    assert torch.equal(out.forces, forces) and torch.equal(out.energy, energy)
    assert WALL.wrap(FlatMLFF())(batch, t, with_forces=False).forces is None
    with pytest.raises(ValueError, match="scale > 0"):
        OverlapRepulsion(scale=0.0)
