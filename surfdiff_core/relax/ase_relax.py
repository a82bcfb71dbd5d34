"""Local relaxation of one structure with any ASE calculator (RSS and quick oracle checks).

The trajectory is subsampled on the fly (every `trajectory_every` optimiser steps plus the final frame):
those frames are MLFF training data, and storing every step of hundreds of relaxations is wasteful.
Forces are stored *without* the FixAtoms projection, i.e. the oracle's forces on every atom, which is
what a force field must learn; `fmax` is taken over the movable atoms only, as the optimiser sees it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.constraints import FixAtoms
from ase.optimize import BFGS, FIRE, LBFGS

from surfdiff_core.errors import SurfdiffError

_OPTIMIZERS = {"BFGS": BFGS, "FIRE": FIRE, "LBFGS": LBFGS}


class RelaxError(SurfdiffError, RuntimeError):
    """The calculator failed (or returned non-finite values) during a relaxation."""


@dataclass
class RelaxResult:
    atoms: Atoms  # final structure, calculator detached (constraints kept)
    energy: float  # eV
    forces: np.ndarray  # [n, 3] eV/Å, unconstrained
    fmax: float  # max force norm over the non-fixed atoms
    steps: int  # optimiser steps taken
    converged: bool
    wall_time: float  # s
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # {positions, energy, forces}


def relax_atoms(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float = 0.05,
    steps: int = 200,
    optimizer: Literal["BFGS", "FIRE", "LBFGS"] = "BFGS",
    trajectory_every: int = 5,
    fixed: Sequence[int] | None = None,
) -> RelaxResult:
    """Relax a copy of `atoms` with `calculator`; atoms in `fixed` are held by FixAtoms.

    Raises RelaxError (with the calculator's message) when the calculator fails, ValueError on bad arguments.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {optimizer!r}")
    if trajectory_every < 1 or steps < 0 or fmax <= 0:
        raise ValueError("need trajectory_every >= 1, steps >= 0 and fmax > 0")
    work = atoms.copy()
    n = len(work)
    fixed_idx = np.unique(np.asarray(list(fixed or []), dtype=int))
    if fixed_idx.size and (fixed_idx.min() < -n or fixed_idx.max() >= n):
        raise ValueError(f"fixed indices out of range for {n} atoms")
    fixed_idx = np.unique(fixed_idx % n) if n else fixed_idx
    if fixed_idx.size:
        work.set_constraint([*work.constraints, FixAtoms(indices=fixed_idx)])
    movable = np.ones(n, dtype=bool)
    movable[fixed_idx] = False
    work.calc = calculator

    trajectory: list[dict[str, Any]] = []
    last_frame_step = -1

    def frame(step: int) -> None:
        nonlocal last_frame_step
        energy, forces = _energy_forces(work)
        trajectory.append({"positions": work.get_positions(), "energy": energy, "forces": forces})
        last_frame_step = step

    opt = _OPTIMIZERS[optimizer](work, logfile=None)
    opt.attach(lambda: frame(opt.nsteps), interval=trajectory_every)
    start = time.perf_counter()
    try:
        if steps > 0:
            opt.run(fmax=fmax, steps=steps)
        if last_frame_step != opt.nsteps:  # the final frame (also: the only frame when steps=0)
            frame(opt.nsteps)
    except RelaxError:
        raise
    except Exception as exc:
        name = getattr(calculator, "name", type(calculator).__name__)
        raise RelaxError(
            f"relaxation with calculator {name!r} failed at step {opt.nsteps} "
            f"({work.get_chemical_formula()}): {type(exc).__name__}: {exc}"
        ) from exc
    wall_time = time.perf_counter() - start

    final = trajectory[-1]
    forces = final["forces"]
    norms = np.linalg.norm(forces, axis=1)
    fmax_movable = float(norms[movable].max()) if movable.any() else 0.0
    out = work.copy()  # copy() drops the calculator; constraints (FixAtoms) are kept
    out.calc = None
    return RelaxResult(
        atoms=out,
        energy=float(final["energy"]),
        forces=forces,
        fmax=fmax_movable,
        steps=int(opt.nsteps),
        converged=bool(fmax_movable <= fmax),
        wall_time=wall_time,
        trajectory=trajectory,
    )


def _energy_forces(atoms: Atoms) -> tuple[float, np.ndarray]:
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(apply_constraint=False), dtype=float)
    if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
        raise RelaxError(f"calculator returned non-finite energy/forces (energy={energy})")
    return energy, forces
