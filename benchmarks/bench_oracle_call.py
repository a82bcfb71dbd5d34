"""One CHGNet energy+force call, as a relaxation makes it: surfdiff's calculator (energy and forces only) against
CHGNet's own ASE calculator (energy, forces, stress and magnetic moments on every call).

    .venv/bin/python benchmarks/bench_oracle_call.py [--calls 20] [--threads 1] [--cells p(4x4) c(2x8)]

Random Ag-O overlayers on 3-layer Ag(111); the two calculators alternate call by call on the same positions
(moved a little each time, so nothing is cached), so load from other jobs hits both alike. Prints seconds per
call and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from surfdiff_core.config import load_config
from surfdiff_core.oracles import get_calculator
from surfdiff_core.system import build_system

COMPOSITION = {"p(4x4)": "Ag12O6", "c(2x8)": "Ag5O3", "p(3x3)": "Ag6O3"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cells", nargs="+", default=["p(4x4)", "c(2x8)"], choices=list(COMPOSITION))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from chgnet.model.dynamics import CHGNetCalculator

    asked = get_calculator("chgnet")
    stock = CHGNetCalculator(model=asked.model, use_device="cpu")
    cfg = load_config("configs/demo.yaml")
    print(f"machine: {platform.node()} ({platform.machine()}), torch {torch.__version__}, {args.threads} thread(s)")
    rng = np.random.default_rng(0)
    for cell in args.cells:
        system = build_system(cfg.substrate, cfg.confinement, cell, COMPOSITION[cell], lattice={"a": 4.17})
        atoms = system.random_structure(rng)
        times: dict[str, list[float]] = {"surfdiff": [], "chgnet": []}
        for k in range(args.calls + 1):
            for name, calc in (("surfdiff", asked), ("chgnet", stock)):
                atoms.positions[-1, 0] += 1e-3  # a new geometry: no cached result
                atoms.calc = calc
                t0 = time.perf_counter()
                atoms.get_potential_energy()
                atoms.get_forces()
                if k:  # the first call of each warms up
                    times[name].append(time.perf_counter() - t0)
        ours, theirs = (statistics.median(times[n]) for n in ("surfdiff", "chgnet"))
        print(f"{cell} {COMPOSITION[cell]} ({len(atoms)} atoms): surfdiff {ours * 1e3:.0f} ms, CHGNet calculator "
              f"{theirs * 1e3:.0f} ms per energy+force call (median of {args.calls}): {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
