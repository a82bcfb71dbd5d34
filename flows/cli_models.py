"""`surfdiff models`: the pretrained models shipped in the package and the models registered in a store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surfdiff_core.errors import ConfigError, SurfdiffError


def _shipped_rows() -> list[dict]:
    from surfdiff_core import pretrained

    rows = []
    for card in pretrained.shipped_models():
        try:
            pretrained.verify(card)
            state = "ok"
        except SurfdiffError as exc:
            state = f"damaged: {exc}"
        rows.append({"name": card.name, "model_id": card.checkpoint.model_id, "energy_model": card.energy_model,
                     "system": f"{card.system.element}({card.system.facet}) L{card.system.layers}",
                     "box_A": [card.system.z_min, card.system.z_max], "elements": card.elements,
                     "training_structures": card.training_data.get("structures"),
                     "training_cell": card.training_data.get("cell"), "epochs": card.epochs,
                     "validation": card.validation, "committee": len(card.committee), "checkpoints": state,
                     "card": str(card.folder / "card.md"), "description": card.description})
    return rows


def _registered_rows(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from flows.cli_common import load_study
    from surfdiff_core.config import SurfdiffConfig
    from surfdiff_core.query import require_existing_store
    from surfdiff_core.stages.common import model_registry, with_store_path

    if args.config:
        cfg = load_study(args.config, args.store)
        require_existing_store(cfg.store)
    else:
        if not Path(args.store).exists():
            raise ConfigError(f"no results store at {args.store}")
        cfg = with_store_path(SurfdiffConfig(), args.store)
    study = None if args.all_studies or not args.config else cfg.name
    with model_registry(cfg) as registry:
        records = registry.find()
    # a study's own models, and the shipped ones it registered (they belong to no study)
    records = [r for r in records if study is None or r.study in (study, None)]
    keys = ("model_id", "study", "pretrained", "system_id", "energy_models", "epochs", "best_val", "n_train",
            "member_of", "round", "checkpoint")
    return f"{cfg.store.path} ({cfg.store.backend})", [{k: getattr(r, k) for k in keys} for r in records]


def cmd_models(args: argparse.Namespace) -> int:
    shipped = _shipped_rows()
    where, registered = _registered_rows(args) if (args.config or args.store) else ("", [])
    if args.json:
        print(json.dumps({"shipped": shipped, "registered": registered}, indent=1, default=str))
        return 0
    print("shipped pretrained models (train.init_from: NAME fine-tunes one; `surfdiff sample CONFIG --model-id NAME` "
          "samples with one):")
    for r in shipped:
        val = r["validation"]
        print(f"  {r['name']} ({r['model_id']}): {r['system']}, box {r['box_A'][0]:g}-{r['box_A'][1]:g} Å, "
              f"{r['energy_model']}, elements {','.join(r['elements'])}; {r['training_structures']} RSS structures "
              f"in {r['training_cell']}, {r['epochs']} epochs, validation forces {val.get('forces', float('nan')):.3f}"
              f", committee of {r['committee'] + 1}; checkpoints {r['checkpoints']}")
        print(f"    {r['description']} (card: {r['card']})")
    if not shipped:
        print("  none in this installation")
    if args.config or args.store:
        print(f"registered in {where}:")
        for r in registered:
            shipped = r["study"] is None and r["pretrained"]
            role = f"member of {r['member_of']}" if r["member_of"] else (
                f"round {r['round']}" if r["round"] is not None else "shipped" if shipped else "trained")
            origin = f", {'is' if shipped else 'from'} {r['pretrained']}" if r["pretrained"] else ""
            best = "-" if r["best_val"] is None else f"{r['best_val']:.4f}"
            print(f"  {r['model_id']} [{role}{origin}] study {r['study'] or '(shipped)'}, {r['system_id']}, "
                  f"{','.join(r['energy_models'])}, {r['epochs']} epochs, best validation {best}")
        if not registered:
            print("  no models")
    return 0


def add_models_parser(sub) -> None:
    m = sub.add_parser("models", help="list the shipped pretrained models and the models registered in a store")
    m.add_argument("--config", default=None, help="also the models of this config's study and store")
    m.add_argument("--store", default=None, metavar="PATH", help="the embedded store at PATH")
    m.add_argument("--all-studies", action="store_true", help="with --config: every study's models in its store")
    m.add_argument("--json", action="store_true", help="print JSON instead of lines")
    m.set_defaults(func=cmd_models)
