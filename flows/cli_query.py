"""`surfdiff query` and `surfdiff store migrate`: reading the results store and maintaining it, and their
parsers. Library imports stay inside the commands, so that the command line starts fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.cli_common import OneLineErrorParser, check_at_least, load_study
from surfdiff_core.errors import ConfigError


# ---- query ------------------------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    from surfdiff_core.config import StoreConfig, SurfdiffConfig
    from surfdiff_core.export import export_docs
    from surfdiff_core.query import (
        best_per_group,
        build_criteria,
        descendants,
        lineage,
        print_table,
        query_docs,
        require_existing_store,
    )
    from surfdiff_core.stages.common import model_registry, open_study_store, with_store_path

    if args.config:
        cfg = load_study(args.config, args.store)
        require_existing_store(cfg.store)  # a query reads: it never creates a store
    else:
        path = args.store or StoreConfig().path
        if not Path(path).exists():
            raise ConfigError(f"no results store at {path} (run `surfdiff rss CONFIG` first or pass --store)")
        cfg = with_store_path(SurfdiffConfig(), path)
    # With a config, every selection is scoped to its study unless another study is named.
    study = args.study or (cfg.name if args.config and not args.all_studies else None)
    crit = build_criteria(
        study=study, energy_model=args.energy_model, system=args.system, composition=args.composition,
        cell=args.cell, source=args.source, max_energy=args.max_energy, run_id=args.run_id,
        model_id=args.model_id, valid_only=args.valid_only,
    )
    if args.export and Path(args.export).suffix.lower() not in (".extxyz", ".xyz", ".cif"):
        raise ConfigError(f"cannot export to {args.export!r}: use a .extxyz, .xyz or .cif file name")
    check_at_least("best", args.best)
    check_at_least("top", args.top)
    if args.models:
        with model_registry(cfg) as registry:
            records = registry.find(study=study)
        keys = ["model_id", "study", "system_id", "energy_models", "epochs", "best_val", "n_train", "member_of",
                "checkpoint"]
        rows = [{k: getattr(r, k) for k in keys} for r in records]
        print(json.dumps(rows, indent=1, default=str) if args.json else
              "\n".join(" ".join("-" if r[k] is None else str(r[k]) for k in keys) for r in rows)
              or "no trained models")
        return 0
    with open_study_store(cfg) as store:
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
        print_table(docs, scope=f"study {study}" if study else "all studies")
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from surfdiff_core.config import StoreConfig
    from surfdiff_core.store.migrate import migrate_store

    source = Path(args.old_path)
    if not source.is_dir():
        raise ConfigError(f"no store directory at {source}")
    n = migrate_store(source, StoreConfig(), args.to)
    print(f"migrated {n} documents from {source} into the embedded store at {args.to or source}")
    return 0


# ---- parsers ----------------------------------------------------------------------------------------------
def add_query_parser(sub) -> None:
    q = sub.add_parser("query", help="list, filter and export structures from the store")
    q.add_argument("--config", default=None, help="the store and study of this config")
    q.add_argument("--store", default=None, metavar="PATH", help="the embedded store at PATH (default data/store)")
    q.add_argument("--study", default=None, help="only this study (default with --config: the config's name)")
    q.add_argument("--all-studies", action="store_true", help="with --config: every study in its store")
    q.add_argument("--energy-model", default=None, help="e.g. emt, chgnet")
    q.add_argument("--system", default=None, help="system id, e.g. 'Ag(fcc111)-c(2x8)-L3'")
    q.add_argument("--composition", default=None, help="overlayer composition, e.g. Ag6O3")
    q.add_argument("--cell", default=None, help="cell name, e.g. 'p(4x4)'")
    q.add_argument("--source", default=None, help="rss | generated | relaxed | dft | single_point")
    q.add_argument("--max-energy", type=float, default=None, help="only energies <= E (eV)")
    q.add_argument("--run-id", default=None)
    q.add_argument("--model-id", default=None)
    q.add_argument("--valid-only", action="store_true", help="skip failed and out-of-box structures")
    q.add_argument("--top", type=int, default=None, help="the K lowest-energy structures")
    q.add_argument("--best", type=int, default=None, metavar="K",
                   help="the K lowest-energy structures per (system, composition, source)")
    q.add_argument("--lineage", default=None, metavar="DOC_ID",
                   help="provenance chain of a document: its parents (generated -> relaxed -> dft) and children")
    q.add_argument("--models", action="store_true", help="list the trained models (the model registry) instead")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--export", default=None, help="write the structures to FILE.extxyz or FILE.cif")
    q.set_defaults(func=cmd_query)


def add_store_parser(sub) -> None:
    st = sub.add_parser("store", help="maintain the results store")
    st_sub = st.add_subparsers(dest="store_command", required=True, parser_class=OneLineErrorParser)
    m = st_sub.add_parser("migrate", help="convert a MontyStore of earlier versions to the embedded store")
    m.add_argument("old_path", help="the old store directory (store.path of the config)")
    m.add_argument("--to", default=None, metavar="PATH", help="write the new store here (default: in place)")
    m.set_defaults(func=cmd_store_migrate)
