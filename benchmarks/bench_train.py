"""Training throughput (structures per second through the combined score + energy + force loss) with the
paper-size model, on EMT RSS data made on the fly (c(2×8) Ag(111), Ag4O2…Ag6O5).

    .venv/bin/python benchmarks/bench_train.py [--structures 24] [--epochs 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.ml.kernel_report import describe, kernel_report
from surfdiff_core.rss import run_rss
from surfdiff_core.stages.common import training_system
from surfdiff_core.store import open_store
from surfdiff_core.train.data import DataScope
from surfdiff_core.train.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--structures", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({
        "substrate": {"element": "Ag", "lattice_constant": "auto", "layers": 3},
        "rss": {"cell": "c(2x8)", "compositions": ["Ag4O2", "Ag5O3", "Ag6O4", "Ag6O5"], "n": args.structures,
                "fmax": 0.1, "steps": 100},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "repeat": 1, "val_fraction": 0.0,
                  "device": args.device},
    })
    print(f"machine: {platform.machine()} {platform.system()}, device {args.device}, torch threads {args.threads}")
    print(describe(kernel_report()))
    with tempfile.TemporaryDirectory() as d, open_store(StoreConfig(backend="memory")) as store:
        run_rss(cfg, store, progress=False)
        scope = DataScope(study=cfg.name, system_id=training_system(cfg).system_id, energy_models=("emt",))
        for repeat in (1, 2):
            tcfg = cfg.train.model_copy(update={"repeat": repeat})
            res = train(store, cfg.model, tcfg, scope=scope, checkpoint_dir=f"{d}/r{repeat}", progress=False)
            print(f"repeat {repeat} ({'with' if repeat > 1 else 'without'} {repeat}x{repeat} tiles): "
                  f"{res.samples_per_second:.1f} training structures/s ({res.n_train} structures, "
                  f"{res.epochs} epochs, {res.wall_time:.1f} s)")


if __name__ == "__main__":
    main()
