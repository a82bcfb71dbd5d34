"""Batched MLFF relaxation of generated structures (FIRE or steepest descent), the step after sampling.

Relaxes the movable atoms of every structure in the MLFF at once, keeping masked atoms fixed, wrapping
in-plane and clamping into the confinement box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from surfdiff_core.diffusion.guidance import DenoiserFn, cap_norm
from surfdiff_core.diffusion.process import SlabGeometry
from surfdiff_core.geometry.batch import DenoiserOutput, SlabBatch


@dataclass(frozen=True)
class RelaxInfo:
    steps: torch.Tensor  # [B] long: steps taken before converging (or the step budget)
    converged: torch.Tensor  # [B] bool: max movable-atom force < fmax
    fmax: torch.Tensor  # [B] final max force norm on movable atoms (eV/Å)
    energy: torch.Tensor | None  # [B] final MLFF energy (eV) when the model returns one


def _per_structure_max(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, device=values.device, dtype=values.dtype)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def _per_structure_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(0, index, values)


def _forces(model: DenoiserFn, batch: SlabBatch, t: torch.Tensor) -> tuple[torch.Tensor, DenoiserOutput]:
    out = model(batch, t, with_forces=True)
    if out.forces is None:
        raise ValueError("mlff_relax needs a model that returns forces")
    return torch.where(batch.movable[:, None], out.forces, torch.zeros_like(out.forces)), out


def _forces_of_unconverged(
    model: DenoiserFn, batch: SlabBatch, t: torch.Tensor, done: torch.Tensor
) -> torch.Tensor:
    """Forces of the structures not yet done (zero on the others): a converged structure no longer moves, so
    its forces need no new evaluation and the batch shrinks as structures converge."""
    if not bool(done.any()):
        return _forces(model, batch, t)[0]
    todo = ~done
    atoms = todo[batch.batch]
    f_todo, _ = _forces(model, batch.select(todo), t[todo])
    f = torch.zeros_like(batch.positions)
    f[atoms] = f_todo
    return f


@torch.no_grad()
def mlff_relax(
    model: DenoiserFn,
    batch: SlabBatch,
    *,
    steps: int = 50,
    fmax: float = 0.05,
    max_step: float = 0.1,
    method: Literal["fire", "sd"] = "fire",
    step_size: float = 1e-3,
    t: float = 0.0,
) -> tuple[SlabBatch, RelaxInfo]:
    """Relax the movable atoms of every structure in the MLFF, batched; returns (relaxed, info).

    method "sd": steepest descent, Δx = step_size·F (step_size in Å²/eV, the paper's ηΔt);
    method "fire": FIRE with ASE's default parameters, per-structure state.
    Every step's per-atom displacement is capped at max_step (Å). A structure stops moving once its max
    movable-atom force is below fmax. The model is called as model(batch, t, with_forces=True) at time
    t (0 = clean structure) and is assumed to enable autograd internally for its forces.
    """
    if method not in ("fire", "sd"):
        raise ValueError(f"unknown method {method!r}")
    geo = SlabGeometry.from_batch(batch)
    n_struct, idx = batch.n_structures, batch.batch
    tt = torch.full((n_struct,), t, device=batch.device, dtype=batch.positions.dtype)
    pos = geo.confine(batch.positions)
    mov = batch.movable[:, None]

    # FIRE state (ASE defaults: dt 0.1, dtmax 1, Nmin 5, finc 1.1, fdec 0.5, astart 0.1, fa 0.99).
    vel = torch.zeros_like(pos)
    fire_dt = torch.full((n_struct,), 0.1, device=pos.device, dtype=pos.dtype)
    fire_a = torch.full_like(fire_dt, 0.1)
    n_pos = torch.zeros(n_struct, device=pos.device, dtype=torch.long)
    taken = torch.zeros(n_struct, device=pos.device, dtype=torch.long)

    done = torch.zeros(n_struct, device=pos.device, dtype=torch.bool)
    for k in range(steps):
        f = _forces_of_unconverged(model, batch.with_positions(pos), tt, done)
        fnorm = _per_structure_max(torch.linalg.norm(f, dim=-1), idx, n_struct)
        done = done | (fnorm < fmax)
        active = ~done
        if not bool(active.any()):
            break
        taken += active.long()
        if method == "sd":
            dr = step_size * f
        elif k == 0:  # as in ASE: no velocity history yet, so no mixing or dt adaptation
            vel = fire_dt[idx, None] * f
            dr = fire_dt[idx, None] * vel
        else:
            p = _per_structure_sum((f * vel).sum(-1), idx, n_struct)
            v_norm = _per_structure_sum((vel * vel).sum(-1), idx, n_struct).sqrt()
            f_norm = _per_structure_sum((f * f).sum(-1), idx, n_struct).sqrt().clamp_min(1e-12)
            up = p > 0
            mix = (fire_a * v_norm / f_norm)[idx, None]
            vel = torch.where(up[idx, None], (1 - fire_a[idx, None]) * vel + mix * f, torch.zeros_like(vel))
            grow = up & (n_pos > 5)
            fire_dt = torch.where(grow, (fire_dt * 1.1).clamp(max=1.0), fire_dt)
            fire_dt = torch.where(up, fire_dt, fire_dt * 0.5)
            fire_a = torch.where(grow, fire_a * 0.99, torch.where(up, fire_a, torch.full_like(fire_a, 0.1)))
            n_pos = torch.where(up, n_pos + 1, torch.zeros_like(n_pos))
            vel = vel + fire_dt[idx, None] * f
            dr = fire_dt[idx, None] * vel
        dr = cap_norm(dr, max_step)
        dr = torch.where(mov & active[idx, None], dr, torch.zeros_like(dr))
        new = geo.confine(pos + dr)
        # Velocity into a wall is lost (the atom was stopped there).
        hit = (new[:, 2] - (pos[:, 2] + dr[:, 2])).abs() > 0
        vel[:, 2] = torch.where(hit, torch.zeros_like(vel[:, 2]), vel[:, 2])
        vel = torch.where(active[idx, None], vel, torch.zeros_like(vel))
        pos = new

    f, out = _forces(model, batch.with_positions(pos), tt)
    fnorm = _per_structure_max(torch.linalg.norm(f, dim=-1), idx, n_struct)
    info = RelaxInfo(steps=taken, converged=fnorm < fmax, fmax=fnorm, energy=out.energy)
    return batch.with_positions(pos), info
