"""Sampling a sweep: batches per target against one stream of shared batches (sample.share_batches).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_shared_batches.py --config configs/sweep-ag111-o.yaml \\
        --n 16 --steps 50 --batch-size 64 --repeats 2

Samples every target of the sweep with the shipped pretrained model `emt-ag111-o` (no training) into a
throw-away store, both ways, and prints wall time, structure-steps per second and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surfdiff_core.config import load_config  # noqa: E402
from surfdiff_core.ml.kernel_report import describe, kernel_report  # noqa: E402
from surfdiff_core.stages import sample  # noqa: E402
from surfdiff_core.stages.common import open_study_store, sample_targets, with_store_path  # noqa: E402


def one_run(cfg, shared: bool, folder: str) -> tuple[float, int]:
    scfg = cfg.sample.model_copy(update={"share_batches": shared})
    run = with_store_path(cfg, str(Path(folder) / ("shared" if shared else "per-target")))
    t0 = time.perf_counter()
    with open_study_store(run) as store:
        res = sample.run(run, store, scfg=scfg, model_id="emt-ag111-o", progress=False)
    wall = time.perf_counter() - t0
    return wall, sum(t.n for t in res.targets) * scfg.steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/sweep-ag111-o.yaml")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--relax-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={
        "n": a.n, "steps": a.steps, "batch_size": a.batch_size, "relax_steps": a.relax_steps})})
    targets = sample_targets(cfg)
    print(describe(kernel_report()))
    print(f"{len(targets)} targets × {a.n} samples, {a.steps} steps, batch {a.batch_size}, MLFF relaxation "
          f"{a.relax_steps} steps, torch threads {torch.get_num_threads()}")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(a.repeats):
        for shared in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                wall, steps = one_run(cfg, shared, folder)
            rates[shared].append(steps / wall)
            print(f"repeat {r + 1}: {'shared batches' if shared else 'per target   '}: {wall:6.1f} s, "
                  f"{steps / wall:7.1f} structure-steps/s")
    per, sh = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median structure-steps/s: per target {per:.1f}, shared {sh:.1f}: ratio {sh / per:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
