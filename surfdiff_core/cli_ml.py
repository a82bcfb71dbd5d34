"""`surfdiff train` and `surfdiff sample`: the generative core from the command line."""

from __future__ import annotations

import argparse
import json

from surfdiff_core.config import with_overrides
from surfdiff_core.errors import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    from surfdiff_core.cli import _config
    from surfdiff_core.stages.common import run_train, store_for

    cfg = _config(args.config)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 (got {args.epochs})")
    if args.device:
        cfg.train.device = args.device
    with store_for(cfg, args.store) as store:
        s = run_train(cfg, store, store_path=args.store, epochs=args.epochs)
    last = s.history[-1] if s.history else {}
    print(f"model {s.model_id}: {s.epochs} epochs, best validation loss {s.best_val:.4f} "
          f"(score {last.get('val_score', float('nan')):.4f}, forces {last.get('val_forces', float('nan')):.4f}); "
          f"{s.n_train} train / {s.n_val} validation structures; {s.samples_per_second:.1f} samples/s")
    print(f"checkpoint: {s.checkpoint}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from surfdiff_core.cli import _config
    from surfdiff_core.stages.common import latest_checkpoint, run_sample, sample_targets, store_for, summary_dict

    cfg = _config(args.config)
    scfg = with_overrides(cfg.sample, {"n": args.n, "steps": args.steps, "guidance": args.guidance,
                                       "sampler": args.sampler, "seed": args.seed, "batch_size": args.batch_size,
                                       "eta_dt": args.eta_dt, "relax": args.relax})
    targets = sample_targets(cfg, [args.cell] if args.cell else None,
                             [args.composition] if args.composition else None)
    from surfdiff_core.stages.common import target_system

    for t in targets:  # validate every target (cell, composition, box) before any work
        target_system(cfg, t)
    ckpt = args.checkpoint or latest_checkpoint(cfg, args.store)
    rows = []
    with store_for(cfg, args.store) as store:
        for t in targets:
            s = run_sample(cfg, store, t, checkpoint=ckpt, scfg=scfg, run_id=args.run_id, device=args.device)
            rows.append(summary_dict(s))
            best = f"{s.best_energy:.3f} eV" if s.best_energy is not None else "-"
            print(f"{s.composition} {s.cell}: {s.n_valid}/{s.n} valid (rejection rate {s.rejection_rate:.1%}), "
                  f"best MLFF energy {best}, {s.structure_steps_per_second:.1f} structure-steps/s")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _add_train(sub, name: str) -> None:
    p = sub.add_parser(name, help="train the denoiser and MLFF on the store's RSS data")
    p.add_argument("config")
    p.add_argument("--store", default=None, help="on-disk store path (default: store.path of the config)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.set_defaults(func=cmd_train)


def _add_sample(sub, name: str) -> None:
    p = sub.add_parser(name, help="generate structures with the trained model into the store")
    p.add_argument("config")
    p.add_argument("--cell", default=None, help="e.g. 'p(4x4)' (default: sample.targets of the config)")
    p.add_argument("--composition", default=None, help="e.g. Ag12O6")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", choices=["em", "ode"], default=None)
    p.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="force-field guidance (default: sample.guidance)")
    p.add_argument("--relax", action=argparse.BooleanOptionalAction, default=None,
                   help="short MLFF relaxation after sampling")
    p.add_argument("--eta-dt", type=float, default=None, help="guidance strength ηΔt in Å²/eV (paper: 0.001)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the newest trained model)")
    p.add_argument("--store", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--run-id", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sample)


COMMANDS = {"train": _add_train, "sample": _add_sample}
