"""Throughput of the SurfaceModel hot path (neighbour list + PaiNN + autograd forces).

A 66-atom p(4x4) Ag12O6/Ag(111)-like slab: 3 Ag layers of 16 (masked) plus 12 Ag and 6 O placed at
random above. For each batch size it times `denoise` score-only (one forward) and guided
(`with_forces=True`: one forward + one backward), the calls a sampler makes per step.

    python benchmarks/bench_model.py [--device cpu|cuda] [--threads 2] [--eager] [--batch-sizes 1 4 16 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms
from ase.build import fcc111

from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.geometry.neighbors import neighbor_list
from surfdiff_core.ml.models import ModelSpec, SurfaceModel
from surfdiff_core.ml.painn import fused_kernels_available


def make_slabs(n: int, seed: int = 0) -> tuple[list[Atoms], list[np.ndarray], list[tuple[float, float]]]:
    rng = np.random.default_rng(seed)
    structs, movable, bounds = [], [], []
    for _ in range(n):
        atoms = fcc111("Ag", size=(4, 4, 3), a=4.09, vacuum=8.0)
        top = float(atoms.positions[:, 2].max())
        xy = rng.uniform(size=(18, 2)) @ np.asarray(atoms.cell)[:2, :2]
        atoms += Atoms("Ag12O6", positions=np.c_[xy, top + rng.uniform(1.0, 5.0, 18)])
        atoms.pbc = [True, True, False]
        mask = np.zeros(len(atoms), bool)
        mask[48:] = True
        structs.append(atoms)
        movable.append(mask)
        bounds.append((top + 0.5, top + 5.5))
    return structs, movable, bounds


def time_call(
    fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds per call (CPU time helps to spot a busy machine)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (kernel build, allocator)
    sync()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < max_reps and (len(wall) < 3 or time.perf_counter() - start < min_time):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--eager", action="store_true", help="eager PyTorch instead of the compiled message op")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per measurement")
    ap.add_argument("--max-reps", type=int, default=20)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = ModelSpec()  # 64 features, 30 rbf, 4 interactions, 6 Å, shared representation
    model = SurfaceModel(spec).to(device).eval()
    model.use_fused_kernels = not args.eager
    fused = device.type == "cpu" and not args.eager and fused_kernels_available()
    print(f"surfdiff bench_model: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"device={device} threads={torch.get_num_threads()} path={'compiled message op' if fused else 'eager'}")
    print(f"spec: {spec.to_dict()}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    header = (
        f"{'B':>4} {'pairs/str':>9} | {'score ms':>9} {'evals/s':>8} {'str-steps/s':>11} | "
        f"{'guided ms':>9} {'cpu ms':>7} {'evals/s':>8} {'str-steps/s':>11} | {'nl ms':>6} | {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for bsz in sorted(args.batch_sizes):
        structs, movable, bounds = make_slabs(bsz)
        batch: SlabBatch = collate(structs, movable, bounds, device=device, dtype=torch.float32)
        t = torch.full((bsz,), 0.5, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_pairs = neighbor_list(batch, spec.cutoff).n_pairs / bsz
        t_nl, _ = time_call(lambda b=batch: neighbor_list(b, spec.cutoff, half=True), device, 0.5, args.max_reps)
        t_score, _ = time_call(lambda b=batch, tt=t: model.denoise(b, tt), device, args.min_time, args.max_reps)
        t_guided, c_guided = time_call(
            lambda b=batch, tt=t: model.denoise(b, tt, with_forces=True), device, args.min_time, args.max_reps
        )
        s_med, g_med, g_cpu, nl_med = (statistics.median(x) for x in (t_score, t_guided, c_guided, t_nl))
        print(
            f"{bsz:>4} {n_pairs:>9.0f} | {s_med * 1e3:>9.1f} {1 / s_med:>8.2f} {bsz / s_med:>11.1f} | "
            f"{g_med * 1e3:>9.1f} {g_cpu * 1e3:>7.0f} {1 / g_med:>8.2f} {bsz / g_med:>11.1f} | "
            f"{nl_med * 1e3:>6.1f} | {peak_memory_mb(device):>8.0f}",
            flush=True,
        )
    print("str-steps/s = structures x model evaluations per second (median time per call); guided = with forces.")
    print("cpu ms: process CPU time per guided call (about threads x wall on an otherwise idle machine).")
    print(f"peak MB: process max RSS so far (CPU) or max allocated (CUDA). load average now: {_load()}")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main(sys.argv[1:])
