"""Sampling throughput: structure-steps per second vs batch size for Ag12O6 on a 3-layer p(4×4) Ag(111)
slab (66 atoms), guided (score + MLFF forces from one shared representation) and unguided, with peak memory.

    .venv/bin/python benchmarks/bench_sampling.py [--batches 1 4 16 64 256] [--steps 5] [--device cpu]

Each point runs in its own process so its peak RSS (CPU) or peak CUDA memory is its own. Model size as the
paper authors' checkpoint: 64 features, 30 RBF, 4 interactions, 6 Å cutoff (random weights: the cost does
not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def one(batch: int, guided: bool, steps: int, device: str, threads: int, shared: bool = True) -> dict:
    import numpy as np
    import torch

    from surfdiff_core.config import ModelConfig, SampleConfig, config_from_dict
    from surfdiff_core.diffusion.guidance import ForceFieldGuidance
    from surfdiff_core.diffusion.samplers import euler_maruyama
    from surfdiff_core.geometry.neighbors import neighbor_list
    from surfdiff_core.sample.generate import prior_batch
    from surfdiff_core.system import build_system
    from surfdiff_core.train.trainer import make_model, make_process

    torch.set_num_threads(threads)
    cfg = config_from_dict({"substrate": {"element": "Ag", "lattice_constant": 4.09, "layers": 3}})
    system = build_system(cfg.substrate, cfg.confinement, "p(4x4)", "Ag12O6")
    mcfg = ModelConfig(shared=shared)
    torch.manual_seed(0)
    model = make_model(mcfg, [8, 47]).to(device).eval()
    process = make_process(mcfg)
    gen = torch.Generator(device=device).manual_seed(0)
    x = process.sample_prior(prior_batch(system, batch, device), generator=gen)
    # pairs at a realistic (relaxed-like) density: the RSS-style random structure of the same system
    ref = prior_batch(system, 1, device).with_positions(
        torch.as_tensor(system.random_structure(np.random.default_rng(0)).positions, dtype=torch.float32,
                        device=device))
    pairs = int(neighbor_list(ref, mcfg.cutoff).i.numel())
    guidance = ForceFieldGuidance(eta_dt=SampleConfig().eta_dt) if guided else None
    euler_maruyama(model.denoise, x, process, steps=1, guidance=guidance, generator=gen)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    euler_maruyama(model.denoise, x, process, steps=steps, guidance=guidance, generator=gen)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"batch": batch, "guided": guided, "atoms": system.n_atoms, "pairs_per_structure": pairs,
            "structure_steps_per_s": batch * steps / wall, "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--separate", action="store_true", help="two PaiNNs (score, MLFF) instead of one shared")
    p.add_argument("--one", nargs=2, metavar=("BATCH", "GUIDED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "1", args.steps, args.device, args.threads,
                             not args.separate)))
        return
    import torch

    from surfdiff_core.ml.kernel_report import describe, kernel_report

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.system()}, device {args.device}, torch threads {args.threads}, "
          f"{'separate score/MLFF networks' if args.separate else 'one shared representation'}")
    print(describe(kernel_report()))
    print(f"{'batch':>5} {'guided':>6} {'structure-steps/s':>18} {'peak MB':>8}  (atoms, pairs/structure)")
    for guided in (True, False):
        for b in args.batches:
            cmd = [sys.executable, __file__, "--one", str(b), str(int(guided)), "--steps", str(args.steps),
                   "--device", args.device, "--threads", str(args.threads)] + (["--separate"] if args.separate else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{b:5d} {str(guided):>6} {r['structure_steps_per_s']:18.1f} {r['peak_mb']:8.0f}  "
                  f"({r['atoms']}, {r['pairs_per_structure']})")


if __name__ == "__main__":
    main()
