"""MLFF committee call on CPU: the members' pair list found once (Committee.predict) against once per member.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_committee.py --batch 32 --repeats 5

Ag10O5 on a 3-layer p(4x4) Ag(111) slab at RSS-like density, the sweep configs' model (32 features, 20 RBF, 3
interactions, 5 Å), four members with random weights (the cost does not depend on them). Prints the time of
one pair list, one member's energy + forces, the committee both ways, and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import numpy as np
    import torch

    from surfdiff_core.config import ModelConfig, config_from_dict
    from surfdiff_core.geometry.neighbors import neighbor_list
    from surfdiff_core.ml.committee import Committee
    from surfdiff_core.sample.generate import prior_batch
    from surfdiff_core.system import build_system
    from surfdiff_core.train.trainer import make_model

    cfg = config_from_dict({"substrate": {"element": "Ag", "lattice_constant": 4.09, "layers": 3}})
    system = build_system(cfg.substrate, cfg.confinement, "p(4x4)", "Ag10O5")
    mcfg = ModelConfig(n_features=32, n_rbf=20, n_interactions=3, cutoff=5.0)
    torch.manual_seed(0)
    models = [make_model(mcfg, [8, 47]).eval() for _ in range(args.members)]
    rng = np.random.default_rng(0)
    positions = [torch.as_tensor(system.random_structure(rng).positions, dtype=torch.float32)
                 for _ in range(args.batch)]
    x = prior_batch(system, args.batch, "cpu").with_positions(torch.cat(positions))
    committee = Committee(models)

    def each_own_pairs():
        return [m(x, None, score=False, energy=True, forces=True) for m in models]

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - t0) / args.repeats

    with torch.no_grad():
        pairs = timed(lambda: neighbor_list(x, mcfg.cutoff, half=True))
        member = timed(lambda: models[0](x, None, score=False, energy=True, forces=True))
        own = timed(each_own_pairs)
        shared = timed(lambda: committee.predict(x))
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, batch "
          f"{args.batch} x {system.n_atoms} atoms, {args.members} members")
    print(f"pair list {pairs * 1e3:.1f} ms; one member E+F {member * 1e3:.1f} ms")
    print(f"committee, pairs per member {own * 1e3:.1f} ms; pairs shared {shared * 1e3:.1f} ms; "
          f"ratio {own / shared:.2f}x")


if __name__ == "__main__":
    main()
