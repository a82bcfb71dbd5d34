"""The overlap wall on and off with one trained checkpoint: validity, and the oracle energies of the top samples.

    .venv/bin/python benchmarks/discovery/wall_ablation.py CHECKPOINT --target "Ag12O6 p(4x4)" --seed 202

Samples `--samples` structures of the target from the same seed with `sample.repulsion` 0 and the given
scales (the benchmark's sampler settings), then relaxes the `--top` valid samples lowest in MLFF energy with the
oracle (ASE BFGS to 0.05 eV/Å, bottom layer fixed), and prints one JSON line per setting. The checkpoints of
`run.py` live in `benchmarks/discovery/<energy model>/stores/checkpoints/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from run import study_config  # noqa: E402

from surfdiff_core.config import config_from_dict  # noqa: E402
from surfdiff_core.oracles.registry import get_calculator  # noqa: E402
from surfdiff_core.relax.ase_relax import relax_atoms  # noqa: E402
from surfdiff_core.sample.generate import generate  # noqa: E402
from surfdiff_core.stages.common import target_system  # noqa: E402
from surfdiff_core.train.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--target", default="Ag12O6 p(4x4)")
    p.add_argument("--seed", type=int, default=202)
    p.add_argument("--energy-model", default="emt")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.75])
    args = p.parse_args()
    bench = argparse.Namespace(energy_model=args.energy_model, rss_train=1, workers=1, model="demo", config=None,
                               epochs=1, targets=[args.target], samples=args.samples, ode_steps=50, steps=200,
                               relax_steps=100, cfg_scale=2.0, budget=args.top, rss_budget=1, extras=False, extras_n=0,
                               windows=["D"], al_rounds=0, al_labels=1, al_epochs=1)
    cfg = config_from_dict(study_config(bench, args.seed, "D", Path("unused")))
    system = target_system(cfg, cfg.sample.targets[0])
    loaded = load_checkpoint(args.checkpoint)
    calc = get_calculator(args.energy_model)
    for scale in args.scales:
        scfg = cfg.sample.model_copy(update={"repulsion": scale})
        t0 = time.perf_counter()
        res = generate(loaded, system, scfg, n=args.samples, seed=args.seed, progress=False)
        sample_s = time.perf_counter() - t0
        order = [i for i in np.argsort(res.energies) if res.valid[i]][: args.top]
        energies = []
        for i in order:
            atoms = system.compose(res.positions[i][system.n_substrate :])
            atoms.positions = res.positions[i]
            energies.append(relax_atoms(atoms, calc, fmax=0.05, steps=300, fixed=list(system.fixed_indices)).energy)
        print(json.dumps({"checkpoint": Path(args.checkpoint).stem, "target": args.target, "seed": args.seed,
                          "repulsion": scale, "valid": f"{sum(res.valid)}/{res.n}", "sample_s": round(sample_s),
                          f"best_of_top{len(energies)}": round(min(energies), 4) if energies else None,
                          "best_of_top4": round(min(energies[:4]), 4) if energies else None,
                          "median": round(float(np.median(energies)), 4) if energies else None}), flush=True)


if __name__ == "__main__":
    main()
