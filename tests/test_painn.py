from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.geometry.neighbors import neighbor_list, pair_vectors
from surfdiff_core.ml import message_op
from surfdiff_core.ml.calculator import MLFFCalculator
from surfdiff_core.ml.models import ModelSpec, SurfaceModel
from surfdiff_core.ml.painn import PaiNN, fused_kernels_available

SPEC = ModelSpec(n_features=16, n_rbf=8, n_interactions=2, cutoff=4.5, elements=[8, 47], time_features=8)
PATHS = ["fused", "eager"]


def _model(shared: bool = True, path: str = "auto", seed: int = 0) -> SurfaceModel:
    """path: "fused" (the compiled message op; skipped when not built), "eager", or "auto"."""
    if path == "fused" and not fused_kernels_available():
        pytest.skip("compiled message op not built")
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict({**SPEC.to_dict(), "shared": shared})
    model = SurfaceModel(spec).double()
    model.use_fused_kernels = path != "eager"
    # non-trivial filter biases and normalisation so that every term is exercised
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PaiNN):
                m.filter_net.weight[:, -1].normal_(std=0.2)
    model.set_energy_normalisation({8: -1.5, 47: -2.5}, 0.3, mean=0.1)
    return model


def _slab(size: tuple[int, int, int], n_o: int, seed: int) -> tuple[Atoms, np.ndarray]:
    rng = np.random.default_rng(seed)
    atoms = fcc111("Ag", size=size, a=4.09, vacuum=6.0)
    n_sub = len(atoms)
    top = atoms.positions[:, 2].max()
    xy = rng.uniform(size=(n_o + 1, 2)) @ np.asarray(atoms.cell)[:2, :2]
    atoms += Atoms("Ag" + "O" * n_o, positions=np.c_[xy, top + rng.uniform(1.2, 2.5, n_o + 1)])
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.pbc = [True, True, False]
    movable = np.zeros(len(atoms), bool)
    movable[n_sub - size[0] * size[1] :] = True  # top substrate layer and the overlayer move
    return atoms, movable


def _batch(structs: list[tuple[Atoms, np.ndarray]]) -> SlabBatch:
    return collate([a for a, _ in structs], [m for _, m in structs], [(0.0, 30.0)] * len(structs), dtype=torch.float64)


def _two_slabs() -> SlabBatch:
    # a p(2x2) cell (smaller than twice the cutoff) and an oblique p(3x2) one
    return _batch([_slab((2, 2, 2), 2, 0), _slab((3, 2, 2), 1, 1)])


def _eval(model: SurfaceModel, batch: SlabBatch, t: torch.Tensor | float = 0.4):
    with torch.no_grad():
        out = model(batch, t, score=True, energy=True, forces=True)
    return out.eps, out.forces, out.energy


def _rotation(axis: np.ndarray, angle: float) -> torch.Tensor:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return torch.as_tensor(np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("axis", [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.3, -1.2, 0.7]])
def test_rotation_equivariance(path: str, axis: list[float]) -> None:
    model = _model(path=path)
    batch = _two_slabs()
    rot = _rotation(np.asarray(axis), 1.1)
    eps, forces, energy = _eval(model, batch)
    rotated = SlabBatch(
        positions=batch.positions @ rot.T,
        numbers=batch.numbers,
        cell=batch.cell @ rot.T,
        batch=batch.batch,
        movable=batch.movable,
        z_bounds=batch.z_bounds,
    )
    eps_r, forces_r, energy_r = _eval(model, rotated)
    torch.testing.assert_close(energy_r, energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_r, eps @ rot.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(forces_r, forces @ rot.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_translation_and_periodic_images(path: str) -> None:
    model = _model(path=path)
    batch = _two_slabs()
    eps, forces, energy = _eval(model, batch)
    shifted = batch.with_positions(batch.positions + torch.tensor([3.1, -7.4, 1.2], dtype=torch.float64))
    # moving single atoms by lattice vectors changes nothing either
    lattice = batch.cell[batch.batch, 0] * 2 - batch.cell[batch.batch, 1]
    jumped = batch.with_positions(batch.positions + lattice * (torch.arange(batch.n_atoms) % 3 == 0)[:, None])
    for other in (shifted, jumped):
        eps2, forces2, energy2 = _eval(model, other)
        torch.testing.assert_close(energy2, energy, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eps2, eps, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(forces2, forces, rtol=1e-8, atol=1e-10)


def test_permutation_equivariance() -> None:
    model = _model()
    atoms, movable = _slab((3, 2, 2), 2, 3)
    perm = np.random.default_rng(0).permutation(len(atoms))
    eps, forces, energy = _eval(model, _batch([(atoms, movable)]))
    eps_p, forces_p, energy_p = _eval(model, _batch([(atoms[perm], movable[perm])]))
    torch.testing.assert_close(energy_p, energy)
    torch.testing.assert_close(eps_p, eps[perm])
    torch.testing.assert_close(forces_p, forces[perm])


@pytest.mark.parametrize("shared", [True, False])
def test_batch_equals_single_structures(shared: bool) -> None:
    model = _model(shared=shared)
    a, b = _slab((2, 2, 2), 2, 0), _slab((3, 2, 2), 1, 1)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    eps, forces, energy = _eval(model, _batch([a, b]), t)
    eps_a, forces_a, energy_a = _eval(model, _batch([a]), t[:1])
    eps_b, forces_b, energy_b = _eval(model, _batch([b]), t[1:])
    torch.testing.assert_close(energy, torch.cat([energy_a, energy_b]))
    torch.testing.assert_close(eps, torch.cat([eps_a, eps_b]))
    torch.testing.assert_close(forces, torch.cat([forces_a, forces_b]))


def test_masked_atoms_and_time_conditioning() -> None:
    model = _model()
    batch = _two_slabs()
    eps, forces, _ = _eval(model, batch, 0.2)
    assert torch.all(eps[~batch.movable] == 0)
    assert torch.all(eps[batch.movable].norm(dim=-1) > 0)
    assert torch.all(forces[~batch.movable].norm(dim=-1) > 0)  # forward: forces on every atom
    eps2, _, _ = _eval(model, batch, 0.9)
    assert not torch.allclose(eps, eps2)
    out = model.denoise(batch, torch.full((2,), 0.2, dtype=torch.float64), with_forces=True)
    assert out.forces is not None and out.energy is not None
    assert torch.all(out.forces[~batch.movable] == 0)
    torch.testing.assert_close(out.forces[batch.movable], forces[batch.movable])
    assert model.denoise(batch, 0.2).forces is None


@pytest.mark.parametrize("path", PATHS)
def test_forces_are_energy_gradient(path: str) -> None:
    model = _model(path=path)
    batch = _two_slabs()
    _, forces, _ = _eval(model, batch)
    rng = np.random.default_rng(1)
    h = 1e-5
    for atom, comp in zip(rng.choice(batch.n_atoms, 6, replace=False), rng.integers(0, 3, 6), strict=True):
        e = []
        for sign in (1, -1):
            pos = batch.positions.clone()
            pos[atom, comp] += sign * h
            with torch.no_grad():
                e.append(model(batch.with_positions(pos), None, score=False, energy=True).energy.sum())
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(float(fd) - float(forces[atom, comp])) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_and_eager_paths_agree_with_gradients(dtype: torch.dtype) -> None:
    fused, eager = _model(path="fused").to(dtype), _model(path="eager").to(dtype)
    batch = _two_slabs().to("cpu", dtype)
    t = torch.tensor([0.3, 0.6], dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    grads = []
    for model in (fused, eager):
        out = model(batch, t, score=True, energy=True, forces=True)
        loss = out.eps.square().sum() + out.energy.square().sum()
        grads.append((out, torch.autograd.grad(loss, list(model.parameters()))))
    (o1, g1), (o2, g2) = grads
    torch.testing.assert_close(o1.eps, o2.eps, **tol)
    torch.testing.assert_close(o1.forces, o2.forces, **tol)
    torch.testing.assert_close(o1.energy, o2.energy, **tol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_full_and_half_pair_lists_agree() -> None:
    model = _model()
    batch = _two_slabs()
    rep = model.representation
    results = []
    for half, fused in ((False, True), (True, True), (False, False), (True, False)):
        nl = neighbor_list(batch, SPEC.cutoff, half=half)
        with torch.no_grad():
            s, v = rep(batch.numbers, pair_vectors(batch.positions, nl), nl.i, nl.j, batch.n_atoms,
                       half_list=half, fused=fused)  # fmt: skip
        results.append((s, v))
    for s, v in results[1:]:
        torch.testing.assert_close(s, results[0][0])
        torch.testing.assert_close(v, results[0][1])


def test_training_forces_backpropagate() -> None:
    model = _model()
    batch = _two_slabs()
    out = model(batch, None, score=False, energy=True, forces=True, training_forces=True)
    assert out.forces is not None and out.forces.requires_grad
    loss = out.forces.square().mean()
    grads = torch.autograd.grad(loss, [p for p in model.representation.parameters()], allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)


def test_force_training_gradients_agree_between_op_and_eager() -> None:
    """Second order through the whole model: d(force loss)/d(parameters) on both paths."""
    batch = _two_slabs()
    results = []
    for path in ("fused", "eager"):
        model = _model(path=path)
        out = model(batch, 0.4, score=True, energy=True, forces=True, training_forces=True)
        loss = out.forces.square().sum() + out.energy.square().sum() + out.eps.square().sum()
        results.append((out.forces, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (f1, g1), (f2, g2) = results
    torch.testing.assert_close(f1, f2)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


# -- the compiled message operator on its own -----------------------------------------------------------------


def _op_inputs(with_v: bool, n: int = 5, nf: int = 2, n_k: int = 3, n_pairs: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    pair_a = torch.randint(0, n, (n_pairs,), generator=gen)
    pair_b = torch.randint(0, n, (n_pairs,), generator=gen)
    v = rand(n, 3, nf) if with_v else None
    return rand(n_pairs, n_k), rand(n_k, 3 * nf), rand(n_pairs, 3), rand(n, 3 * nf), v, pair_a, pair_b


def _eager_messages(phi, weight, direction, x, v, pair_a, pair_b):
    """Reference: both directions of every pair with materialised filters."""
    n, nf = x.shape[0], x.shape[1] // 3
    recv, send = torch.cat([pair_a, pair_b]), torch.cat([pair_b, pair_a])
    w_s, w_r, w_v = (torch.cat([phi, phi]) @ weight).split(nf, dim=1)
    x_s, x_r, x_v = x[send].split(nf, dim=1)
    m_vec = (w_r * x_r)[:, None, :] * torch.cat([direction, -direction])[:, :, None]
    if v is not None:
        m_vec = m_vec + (w_v * x_v)[:, None, :] * v[send]
    ds = x.new_zeros(n, nf).index_add(0, recv, w_s * x_s)
    return ds, x.new_zeros(n, 3, nf).index_add(0, recv, m_vec)


needs_op = pytest.mark.skipif(not fused_kernels_available(), reason="compiled message op not built")


@needs_op
@pytest.mark.parametrize("with_v", [True, False])
@pytest.mark.parametrize("n_pairs", [30, 500])
def test_op_matches_eager_reference(with_v: bool, n_pairs: int) -> None:
    """500 pairs on 3 threads: several chunks with overlapping atom windows, reduced without atomics."""
    inputs = _op_inputs(with_v, n=40, nf=5, n_k=4, n_pairs=n_pairs)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = message_op.painn_messages(*inputs)
    finally:
        torch.set_num_threads(threads)
    ref = _eager_messages(*inputs)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)
    cotangents = [torch.randn_like(t) for t in ref]
    wrt = [t for t in inputs[:5] if t is not None]
    grads = torch.autograd.grad(out, wrt, cotangents)
    grads_ref = torch.autograd.grad(ref, wrt, cotangents)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@needs_op
def test_op_runs_on_every_intra_op_thread() -> None:
    """at::parallel_for in the extension is an OpenMP region: built without -fopenmp it runs on one thread."""
    from surfdiff_core.ml import _painn_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert _painn_ops.parallel_team_size() == 3
    finally:
        torch.set_num_threads(threads)
    assert _painn_ops.parallel_team_size() == threads


@needs_op
@pytest.mark.parametrize("with_v", [True, False])
def test_op_first_and_second_derivatives(with_v: bool) -> None:
    phi, weight, direction, x, v, pair_a, pair_b = _op_inputs(with_v)

    def messages(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return message_op.painn_messages(*args, pair_a, pair_b)

    args = (phi, weight, direction, x, v)
    assert torch.autograd.gradcheck(messages, args)
    assert torch.autograd.gradgradcheck(messages, args)


@needs_op
def test_op_opcheck_and_compile() -> None:
    inputs = _op_inputs(True)
    result = torch.library.opcheck(torch.ops.surfdiff.painn_messages.default, inputs)
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(message_op.painn_messages, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(*inputs), message_op.painn_messages(*inputs), strict=True):
        torch.testing.assert_close(a, b)


@needs_op
def test_op_rejects_bad_inputs() -> None:
    phi, weight, direction, x, v, pair_a, pair_b = (None if t is None else t.detach() for t in _op_inputs(True))
    op = torch.ops.surfdiff.painn_messages
    cases = [
        ((phi.half(), weight.half(), direction.half(), x.half(), None), "float32 or float64"),
        ((phi.float(), weight, direction, x, v), "phi has dtype Float"),
        ((phi, weight, direction, x.t().contiguous().t(), v), "x must be contiguous"),
        ((phi, weight, direction.to("meta"), x, v), "several devices"),
        ((phi, weight[:, :3].contiguous(), direction, x, v), r"weight must be \[K, 3F\]"),
        ((phi, weight, direction, x, v[:, :2].contiguous()), r"v must be \[N, 3, F\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args, pair_a, pair_b)
    with pytest.raises(RuntimeError, match="int64"):
        op(phi, weight, direction, x, v, pair_a.int(), pair_b)
    with pytest.raises(RuntimeError, match="outside"):
        op(phi, weight, direction, x, v, pair_a + x.shape[0], pair_b)


def test_fallback_warns_once_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(path="auto")
    batch = _two_slabs()
    with torch.no_grad():
        expected = model(batch, 0.4).eps
    monkeypatch.setenv("SURFDIFF_NO_KERNELS", "1")
    monkeypatch.setattr(message_op, "_WARNED", False)
    assert not fused_kernels_available()
    with pytest.warns(RuntimeWarning, match="SURFDIFF_NO_KERNELS"), torch.no_grad():
        eps = model(batch, 0.4).eps
    torch.testing.assert_close(eps, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        with torch.no_grad():
            model(batch, 0.4)


def test_spec_round_trip_and_unknown_elements() -> None:
    spec = ModelSpec.from_dict(SPEC.to_dict())
    assert spec == SPEC
    with pytest.raises(ValueError):
        ModelSpec.from_dict({**SPEC.to_dict(), "bogus": 1})
    model = _model()
    atoms, movable = _slab((2, 2, 2), 1, 0)
    atoms.numbers[-1] = 29  # Cu is not in the spec
    with pytest.raises(ValueError, match="elements"):
        _eval(model, _batch([(atoms, movable)]))


def test_fit_energy_normalisation() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    numbers = [np.array([8] * n_o + [47] * n_ag) for n_o, n_ag in rng.integers(1, 10, size=(12, 2))]
    energies = [(-4.0 * (z == 8).sum() - 2.5 * (z == 47).sum()) + rng.normal(scale=0.01) for z in numbers]
    fitted = model.fit_energy_normalisation(energies, numbers)
    assert abs(fitted["atomref"][8] + 4.0) < 0.05 and abs(fitted["atomref"][47] + 2.5) < 0.05
    assert 0 < model.energy_std < 0.05


def test_calculator_relaxes_toy_slab_with_ase_optimiser() -> None:
    model = _model()
    atoms, movable = _slab((2, 2, 2), 1, 5)
    atoms.set_constraint(FixAtoms(mask=~movable))
    atoms.calc = MLFFCalculator(model)
    e0 = atoms.get_potential_energy()
    f0 = atoms.get_forces(apply_constraint=False)
    # calculator forces are the model's forces
    _, forces, energy = _eval(model, _batch([(atoms, movable)]))
    np.testing.assert_allclose(e0, float(energy[0]), rtol=1e-12)
    np.testing.assert_allclose(f0, forces.numpy(), rtol=1e-8, atol=1e-12)
    fixed = atoms.positions[~movable].copy()
    opt = BFGS(atoms, logfile=None, maxstep=0.05)
    opt.run(fmax=1e-3, steps=15)
    assert atoms.get_potential_energy() < e0
    np.testing.assert_array_equal(atoms.positions[~movable], fixed)
    assert np.isfinite(atoms.get_forces()).all()
