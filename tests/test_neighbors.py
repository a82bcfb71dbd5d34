from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111
from ase.neighborlist import neighbor_list as ase_neighbor_list

from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.geometry.neighbors import neighbor_list, pair_vectors

CUTOFF = 6.0


def _slab(size: tuple[int, int, int], rng: np.random.Generator, n_ad: int = 0, jitter: float = 0.05) -> Atoms:
    atoms = fcc111("Ag", size=size, a=4.09, vacuum=8.0)
    atoms.positions += rng.normal(scale=jitter, size=atoms.positions.shape)
    if n_ad:
        top = atoms.positions[:, 2].max()
        frac = rng.uniform(size=(n_ad, 2))
        xy = frac @ np.asarray(atoms.cell)[:2, :2]
        z = top + rng.uniform(1.5, 4.0, size=n_ad)
        atoms += Atoms("O" * n_ad, positions=np.c_[xy, z])
    atoms.pbc = [True, True, False]
    return atoms


def _pairs(i: np.ndarray, j: np.ndarray, shift: np.ndarray) -> set[tuple[int, int, int, int]]:
    return {(int(a), int(b), int(s0), int(s1)) for a, b, s0, s1 in zip(i, j, shift[:, 0], shift[:, 1], strict=True)}


def _batch(structs: list[Atoms], dtype: torch.dtype = torch.float64) -> SlabBatch:
    mov = [np.ones(len(a), bool) for a in structs]
    zb = [(0.0, 30.0)] * len(structs)
    return collate(structs, mov, zb, dtype=dtype)


def _check_against_ase(structs: list[Atoms], cutoff: float = CUTOFF) -> None:
    batch = _batch(structs)
    nl = neighbor_list(batch, cutoff)
    assert nl.i.dtype == torch.long and nl.shifts.dtype == batch.positions.dtype
    assert bool((nl.i[1:] >= nl.i[:-1]).all()), "centre index must be sorted"
    starts = np.cumsum([0] + [len(a) for a in structs])
    i_all, j_all = nl.i.numpy(), nl.j.numpy()
    for b, atoms in enumerate(structs):
        sel = (i_all >= starts[b]) & (i_all < starts[b + 1])
        assert ((j_all[sel] >= starts[b]) & (j_all[sel] < starts[b + 1])).all()
        # integer shifts back from the Cartesian ones (positions were not wrapped by the caller)
        cell = np.asarray(atoms.cell)
        int_shift = np.linalg.solve(cell.T, nl.shifts.numpy()[sel].T).T
        assert np.allclose(int_shift, np.round(int_shift), atol=1e-8)
        assert np.allclose(int_shift[:, 2], 0.0)
        ours = _pairs(i_all[sel] - starts[b], j_all[sel] - starts[b], np.round(int_shift).astype(int))
        ai, aj, aS = ase_neighbor_list("ijS", atoms, cutoff)
        ref = _pairs(ai, aj, aS)
        assert len(ours) == int(sel.sum()), "duplicate pairs"
        assert ours == ref
        # and the vectors reproduce ASE's distances
        d = torch.linalg.vector_norm(pair_vectors(batch.positions, nl)[torch.as_tensor(sel)], dim=-1)
        ad = ase_neighbor_list("d", atoms, cutoff)
        assert np.allclose(np.sort(d.numpy()), np.sort(ad))


def test_fcc111_p4x4_matches_ase() -> None:
    rng = np.random.default_rng(0)
    _check_against_ase([_slab((4, 4, 3), rng, n_ad=18)])


def test_small_cell_below_twice_cutoff() -> None:
    rng = np.random.default_rng(1)
    # p(1x1) and p(2x2) cells: heights 2.5 and 5 A, many images of each atom incl. itself
    _check_against_ase([_slab((1, 1, 3), rng), _slab((2, 2, 2), rng, n_ad=2)])


def test_non_orthogonal_and_tilted_cells() -> None:
    rng = np.random.default_rng(2)
    a = _slab((3, 2, 3), rng, n_ad=3)
    # shear the in-plane cell into a strongly oblique one and tilt a3 (z is not periodic)
    cell = np.asarray(a.cell).copy()
    cell[1] = cell[1] + 0.7 * cell[0]
    cell[2] = [2.0, -1.0, cell[2, 2]]
    a.set_cell(cell, scale_atoms=False)
    _check_against_ase([a])


def test_batch_of_different_cells_and_unwrapped_positions() -> None:
    rng = np.random.default_rng(3)
    structs = [_slab((4, 4, 3), rng, n_ad=18), _slab((2, 3, 2), rng, n_ad=1), _slab((3, 3, 3), rng, n_ad=9)]
    # atoms outside the cell must be handled (the list does its own wrapping)
    structs[2].positions[:5] += np.asarray(structs[2].cell)[0] * 1.3 - np.asarray(structs[2].cell)[1] * 2.0
    _check_against_ase(structs)


def test_float32_and_pair_vector_gradient() -> None:
    rng = np.random.default_rng(4)
    structs = [_slab((2, 2, 3), rng, n_ad=2), _slab((3, 3, 2), rng)]
    b32 = _batch(structs, torch.float32)
    nl = neighbor_list(b32, CUTOFF)
    assert nl.shifts.dtype == torch.float32
    pos = b32.positions.clone().requires_grad_(True)
    vec = pair_vectors(pos, nl)
    (g,) = torch.autograd.grad(vec.sum(), pos)
    # each atom is j as often as it is i in a full list, so the sums cancel
    assert torch.allclose(g, torch.zeros_like(g))


@pytest.mark.parametrize("cutoff", [2.0, 3.5])
def test_short_cutoffs(cutoff: float) -> None:
    rng = np.random.default_rng(5)
    _check_against_ase([_slab((2, 2, 3), rng, n_ad=2), _slab((3, 3, 3), rng)], cutoff=cutoff)


def test_half_list_is_one_direction_of_the_full_list() -> None:
    rng = np.random.default_rng(6)
    # includes a p(1x1) cell where atoms pair with their own images
    batch = _batch([_slab((1, 1, 3), rng), _slab((3, 3, 2), rng, n_ad=3)])
    full = neighbor_list(batch, CUTOFF)
    half = neighbor_list(batch, CUTOFF, half=True)
    assert 2 * half.n_pairs == full.n_pairs
    assert bool((half.i <= half.j).all())

    def keyed(i: torch.Tensor, j: torch.Tensor, s: torch.Tensor) -> set[tuple[int, int, float, float, float]]:
        return {(a, b, *np.round(v, 6).tolist()) for a, b, v in zip(i.tolist(), j.tolist(), s.numpy(), strict=True)}

    both = keyed(half.i, half.j, half.shifts) | keyed(half.j, half.i, -half.shifts)
    assert both == keyed(full.i, full.j, full.shifts)
