"""MLFF energy+force evaluations per second against CHGNet on the same structures (Ag12O6 on 3-layer
p(4×4) Ag(111), 66 atoms): the MLFF exists to be far cheaper than the oracle it learns.

    .venv/bin/python benchmarks/bench_mlff.py [--n 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def evaluations_per_second(structures, calc) -> float:
    """ASE calculator, one structure at a time (after one warm-up evaluation)."""
    warm = structures[0].copy()
    warm.calc = calc
    warm.get_forces()
    t0 = time.perf_counter()
    for a in structures:
        a = a.copy()
        a.calc = calc
        a.get_forces()
    return len(structures) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from surfdiff_core.config import ModelConfig, config_from_dict
    from surfdiff_core.geometry.batch import collate
    from surfdiff_core.ml.calculator import MLFFCalculator
    from surfdiff_core.system import build_system
    from surfdiff_core.train.trainer import make_model

    cfg = config_from_dict({"substrate": {"element": "Ag", "lattice_constant": 4.09, "layers": 3}})
    system = build_system(cfg.substrate, cfg.confinement, "p(4x4)", "Ag12O6")
    rng = np.random.default_rng(0)
    structures = [system.random_structure(rng) for _ in range(args.n)]
    print(f"machine: {platform.machine()} {platform.system()}, torch threads {args.threads}, "
          f"{system.n_atoms} atoms, {args.n} structures")
    model = make_model(ModelConfig(), [8, 47]).eval()
    mlff_single = evaluations_per_second(structures, MLFFCalculator(model))
    batch = collate(structures, [system.movable] * args.n, [system.z_box] * args.n)
    model(batch, None, score=False, energy=True, forces=True)  # warm-up
    t0 = time.perf_counter()
    model(batch, None, score=False, energy=True, forces=True)
    mlff_batched = args.n / (time.perf_counter() - t0)
    print(f"MLFF (PaiNN 64/30/4, 6 Å) ASE calculator, one at a time: {mlff_single:8.1f} evaluations/s")
    print(f"MLFF batched ({args.n} structures per call):              {mlff_batched:8.1f} evaluations/s")
    try:
        from surfdiff_core.oracles import get_calculator

        chg = get_calculator("chgnet")
    except Exception as exc:  # noqa: BLE001
        print(f"CHGNet not available: {exc}")
        return
    chgnet = evaluations_per_second(structures, chg)
    print(f"CHGNet ASE calculator:                                 {chgnet:8.1f} evaluations/s")
    print(f"ratio MLFF/CHGNet: {mlff_single / chgnet:.1f}x one at a time, {mlff_batched / chgnet:.1f}x batched")


if __name__ == "__main__":
    main()
