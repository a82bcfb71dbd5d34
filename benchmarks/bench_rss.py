"""RSS throughput: relaxations per minute on c(2×8) Ag(111), Ag4O2 … Ag6O5, with EMT (and CHGNet).

    .venv/bin/python benchmarks/bench_rss.py [--n 40] [--workers 1 2] [--oracles emt chgnet]

Prints relaxations/minute and mean optimiser steps per structure for each oracle and worker count.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.rss import run_rss
from surfdiff_core.store import open_store

COMPOSITIONS = ["Ag4O2", "Ag4O3", "Ag4O4", "Ag5O2", "Ag5O3", "Ag5O4", "Ag5O5", "Ag6O2", "Ag6O3", "Ag6O4", "Ag6O5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=33)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--oracles", nargs="+", default=["emt"])
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {platform.system()}, python {platform.python_version()}")
    for oracle in args.oracles:
        for workers in args.workers:
            cfg = config_from_dict({
                "substrate": {"element": "Ag", "facet": "fcc111", "lattice_constant": "auto", "layers": 3},
                "oracle": {"name": oracle},
                "rss": {"cell": "c(2x8)", "compositions": COMPOSITIONS, "n": args.n, "fmax": args.fmax,
                        "steps": args.steps, "workers": workers},
            })
            with tempfile.TemporaryDirectory() as d, open_store(StoreConfig(backend="monty"), path=d) as store:
                t0 = time.perf_counter()
                report = run_rss(cfg, store, progress=False)
                wall = time.perf_counter() - t0
                steps = [doc.steps for doc in store.find({}) if doc.steps is not None]
            print(f"{oracle:8s} workers={workers}: {report.done} relaxations in {wall:6.1f} s -> "
                  f"{60 * report.done / wall:7.1f} relaxations/min, mean {sum(steps) / max(len(steps), 1):.0f} "
                  f"steps (fmax {args.fmax}), {report.out_of_box} left the box")


if __name__ == "__main__":
    main()
