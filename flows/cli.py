"""The `surfdiff` console script: the library's commands plus the orchestrated ones (run, relax, serve)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from surfdiff_core.cli import _config
from surfdiff_core.cli import main as core_main
from surfdiff_core.config import with_overrides
from surfdiff_core.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args.config)  # one clear line for a broken config, before Prefect starts
    if args.rss_n is not None and args.rss_n < 0:
        raise ConfigError("--rss-n must be >= 0")
    from surfdiff_core.stages.common import sample_targets, target_system

    for t in sample_targets(cfg):
        target_system(cfg, t)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("SURFDIFF_PROGRESS", "1" if sys.stderr.isatty() else "0")
    # The temporary local API needs no telemetry (and its heartbeat races the run for the SQLite lock).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.discovery import discovery_flow

    result = discovery_flow(config_path=args.config, store_path=args.store, rss_n=args.rss_n)
    store = args.store or cfg.store.path
    print("\n=== surfdiff discovery finished ===")
    print(f"RSS: {result['rss']['done']} new + {result['rss']['skipped']} reused structures")
    print(f"model: {result['model']['model_id']} ({result['model']['checkpoint']})")
    if result["model"].get("resumed_from"):
        print(f"resumed training at epoch {result['model']['resumed_from']}")
    for r in result["samples"]:
        best = f"{r['best_energy']:.4f} eV" if r["best_energy"] is not None else "-"
        print(f"generated {r['composition']} {r['cell']}: {r['n_valid']}/{r['n']} valid, best MLFF energy {best}")
    for key, e in sorted(result["relax"]["best"].items()):
        print(f"relaxed ({result['relax']['method']}) best {key}: {e:.4f} eV")
    print(f"\nresults store: {store} ({cfg.store.backend}); figures: {os.path.join(os.path.dirname(store), 'figures')}")
    print("query them with, e.g.:")
    print(f"  surfdiff query --config {args.config} --source relaxed --top 5")
    print(f"  surfdiff query --config {args.config} --source generated --top 10 --export best.extxyz")
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    from surfdiff_core.stages.common import store_for
    from surfdiff_core.stages.relax import run_relax

    cfg = _config(args.config)
    rcfg = with_overrides(cfg.relax, {"top_k": args.top_k, "method": args.method})
    with store_for(cfg, args.store) as store:
        s = run_relax(cfg, store, rcfg=rcfg, store_path=args.store)
    print(f"relax ({s.method}): {s.candidates} candidates, {s.relaxed} relaxed, {s.skipped} reused, "
          f"{s.failed} failed")
    for key, e in sorted(s.best.items()):
        print(f"  best {key}: {e:.4f} eV")
    return 0


def _add_run(sub, name: str) -> None:
    p = sub.add_parser(name, help="the whole discovery pipeline (Prefect flow, embedded store, no server)")
    p.add_argument("config")
    p.add_argument("--store", default=None)
    p.add_argument("--rss-n", type=int, default=None, help="override rss.n")
    p.set_defaults(func=cmd_run)


def _add_relax(sub, name: str) -> None:
    p = sub.add_parser(name, help="relax the best generated candidates (jobflow/atomate2)")
    p.add_argument("config")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--method", default=None, help="emt | chgnet | sevennet | gpaw | vasp")
    p.add_argument("--store", default=None)
    p.set_defaults(func=cmd_relax)


def _add_serve(sub, name: str) -> None:
    from deploy.serve import add_serve_parser

    add_serve_parser(sub, name)


COMMANDS = {"relax": _add_relax, "run": _add_run, "serve": _add_serve}


def main(argv: Sequence[str] | None = None) -> int:
    return core_main(argv, extra=COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
