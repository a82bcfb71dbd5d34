"""`surfdiff` command line: thin argument parsing over the library. User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from surfdiff_core.errors import ConfigError, SurfdiffError

DEFAULT_STORE = "data/store"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config(path: str):
    from surfdiff_core.config import load_config

    return load_config(path)


def _store_from(cfg, store_path: str | None):
    """The store of the config (or the embedded default), with --store overriding the on-disk path."""
    from surfdiff_core.config import StoreConfig
    from surfdiff_core.store import open_store

    scfg = cfg.store if cfg is not None else StoreConfig()
    if store_path:
        scfg = scfg.model_copy(update={"backend": "monty" if scfg.backend in ("memory", "mongo") else scfg.backend})
        return open_store(scfg, path=store_path)
    return open_store(scfg)


# ---- rss --------------------------------------------------------------------------------------------------
def cmd_rss(args: argparse.Namespace) -> int:
    from surfdiff_core.rss import run_rss

    cfg = _config(args.config)
    if args.n is not None and args.n < 0:
        raise ConfigError(f"--n must be >= 0 (got {args.n})")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {args.workers})")
    # Validate the whole search (systems, box, lattice) before the store is opened: nothing half-written.
    from surfdiff_core.rss import resolve_lattice, systems_for

    systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, resolve_lattice(cfg))
    with _store_from(cfg, args.store) as store:
        report = run_rss(cfg, store, n=args.n, seed=args.seed, workers=args.workers, run_id=args.run_id)
    print(
        f"RSS: {report.done} relaxed, {report.skipped} already in the store, {report.failed} failed, "
        f"{report.out_of_box} left the box; {report.per_minute:.1f} relaxations/min"
    )
    for comp, e in sorted(report.best.items()):
        print(f"  best {comp}: {e:.4f} eV")
    print(f"store: {store.label}")
    return 0


# ---- query ------------------------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    from surfdiff_core.export import export_docs
    from surfdiff_core.query import best_per_group, build_criteria, descendants, lineage, query_docs

    cfg = _config(args.config) if args.config else None
    crit = build_criteria(
        system=args.system, composition=args.composition, cell=args.cell, source=args.source,
        max_energy=args.max_energy, run_id=args.run_id, valid_only=args.valid_only,
    )
    if args.export and Path(args.export).suffix.lower() not in (".extxyz", ".xyz", ".cif"):
        raise ConfigError(f"cannot export to {args.export!r}: use a .extxyz, .xyz or .cif file name")
    store_path = args.store or (None if cfg else DEFAULT_STORE)
    if cfg is None and not Path(store_path).exists():
        raise ConfigError(f"no results store at {store_path} (run `surfdiff rss CONFIG` first or pass --store)")
    if args.models:
        from surfdiff_core.config import StoreConfig
        from surfdiff_core.store.models import list_models

        scfg = cfg.store if cfg is not None else StoreConfig()
        records = list_models(scfg, args.store or (None if cfg else store_path))
        keys = ["model_id", "system_id", "epochs", "best_val", "n_train", "n_val", "checkpoint"]
        rows = [{k: r.get(k) for k in keys} for r in records]
        print(json.dumps(rows, indent=1, default=str) if args.json else
              "\n".join(" ".join(str(r[k]) for k in keys) for r in rows) or "no trained models")
        return 0
    if args.best is not None and args.best < 1:
        raise ConfigError("--best must be a positive number")
    with _store_from(cfg, store_path) as store:
        if args.lineage:
            docs = lineage(store, args.lineage)
            docs += [d for d in descendants(store, args.lineage) if d.doc_id not in {x.doc_id for x in docs}]
        else:
            docs = query_docs(store, crit, top=args.top)
        if args.best:
            groups = best_per_group(docs, k=args.best)
            docs = [d for key in sorted(groups) for d in groups[key]]
    if args.export:
        out = export_docs(docs, args.export)
        print(f"exported {len(docs)} structures to {out}", file=sys.stderr)
    if args.json:
        print(json.dumps([d.summary() for d in docs], indent=1, default=str))
    else:
        _print_table(docs)
    return 0


def _print_table(docs) -> None:
    if not docs:
        print("no matching structures")
        return
    head = f"{'doc_id':30} {'source':9} {'system':28} {'composition':11} {'energy/eV':>11} {'fmax':>6} {'steps':>5}"
    print(head)
    for d in docs:
        e = f"{d.energy:11.4f}" if d.energy is not None else f"{'-':>11}"
        f = f"{d.fmax:6.3f}" if d.fmax is not None else f"{'-':>6}"
        s = f"{d.steps:5d}" if d.steps is not None else f"{'-':>5}"
        flag = "" if d.valid and d.in_box else ("  (error)" if d.error else "  (out of box)")
        print(f"{d.doc_id:30} {d.source:9} {d.system_id:28} {d.composition:11} {e} {f} {s}{flag}")
    print(f"{len(docs)} structures")


# ---- parser -----------------------------------------------------------------------------------------------
def build_parser(extra: dict[str, Callable] | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="surfdiff", description="Generative diffusion for surface structure discovery.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("rss", help="random structure search: training data into the store")
    r.add_argument("config", help="YAML config (see configs/)")
    r.add_argument("--n", type=int, default=None, help="number of structures (default: rss.n of the config)")
    r.add_argument("--seed", type=int, default=None, help="run seed (default: rss.seed)")
    r.add_argument("--store", default=None, help="on-disk store path (default: store.path of the config)")
    r.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: rss.workers)")
    r.add_argument("--run-id", default=None, help="label stored with every document")
    r.set_defaults(func=cmd_rss)

    q = sub.add_parser("query", help="list, filter and export structures from the store")
    q.add_argument("--config", default=None, help="use the store of this config")
    q.add_argument("--store", default=None, help=f"on-disk store path (default {DEFAULT_STORE})")
    q.add_argument("--system", default=None, help="system id, e.g. 'Ag(fcc111)-c(2x8)-L3'")
    q.add_argument("--composition", default=None, help="overlayer composition, e.g. Ag6O3")
    q.add_argument("--cell", default=None, help="cell name, e.g. 'p(4x4)'")
    q.add_argument("--source", default=None, help="rss | generated | relaxed | dft")
    q.add_argument("--max-energy", type=float, default=None, help="only energies <= E (eV)")
    q.add_argument("--run-id", default=None)
    q.add_argument("--valid-only", action="store_true", help="skip failed and out-of-box structures")
    q.add_argument("--top", type=int, default=None, help="the K lowest-energy structures")
    q.add_argument("--best", type=int, default=None, metavar="K",
                   help="the K lowest-energy structures per (system, composition, source)")
    q.add_argument("--lineage", default=None, metavar="DOC_ID",
                   help="provenance chain of a document: its parents (generated -> relaxed -> dft) and children")
    q.add_argument("--models", action="store_true", help="list the trained models (checkpoint ids) instead")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--export", default=None, help="write the structures to FILE.extxyz or FILE.cif")
    q.set_defaults(func=cmd_query)

    from surfdiff_core.cli_ml import COMMANDS

    for name, adder in {**COMMANDS, **(extra or {})}.items():
        adder(sub, name)
    return p


def main(argv: Sequence[str] | None = None, extra: dict[str, Callable] | None = None) -> int:
    """Entry point; `extra` adds sub-commands (flows/cli.py adds the orchestration ones: run, relax, serve)."""
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SurfdiffError as exc:
        print(f"surfdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"surfdiff {args.command}: interrupted; finished work is saved, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SURFDIFF_DEBUG"):
            raise
        print(f"surfdiff {args.command}: error: {type(exc).__name__}: {exc} (SURFDIFF_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
