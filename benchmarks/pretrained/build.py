"""Build a shipped pretrained model: RSS data, training, export with its model card, and its measurement.

    # data and training (each resumable: stop it, run it again; rss.n may grow, earlier structures are reused)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pretrained/build.py configs/pretrained/emt-ag111-o.yaml \\
        --name emt-ag111-o --workdir /tmp/pretrained
    # sample a target with the shipped model, no training, and evaluate it against RSS in that cell
    .venv/bin/python benchmarks/pretrained/build.py configs/pretrained/emt-ag111-o.yaml --name emt-ag111-o \\
        --workdir /tmp/pretrained --measure

The export strips the optimiser and resume state (a few hundred kB per checkpoint), writes the checkpoints as
`<model id>.pt` into surfdiff_core/pretrained/<name>/ with card.json (SHA-256 of each) and card.md. The
measurement adds its figures to the card; the checkpoints and their hashes stay as they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from surfdiff_core.pretrained import SHIPPED_DIR, CardSystem, ModelCard, ShippedCheckpoint  # noqa: E402

KEEP = ("format", "model_id", "spec", "model_config", "diffusion", "state_dict", "epoch", "best_val", "history",
        "force_scale", "finished")


def study_config(path: str, workdir: Path, store: str | None):
    from surfdiff_core.config import load_config
    from surfdiff_core.stages.common import with_store_path

    cfg = load_config(path)
    return with_store_path(cfg, store or str(workdir / cfg.name / "store"))


def strip(src: str | Path, dest: Path) -> None:
    ck = torch.load(src, map_location="cpu", weights_only=True)
    data = dict(ck.get("data") or {})
    data.pop("doc_ids", None)  # ids of the builder's own store: meaningless elsewhere
    out = {k: ck[k] for k in KEEP if k in ck}
    out["data"] = data
    tmp = dest.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, dest)


def best_validation(history: list[dict]) -> dict[str, float]:
    if not history:
        return {}
    best = min(history, key=lambda row: row.get("val_loss", float("inf")))
    return {k[4:]: float(v) for k, v in best.items() if k.startswith("val_")} | {"epoch": float(best["epoch"])}


def train_and_export(cfg, name: str, description: str, *, skip_rss: bool) -> ModelCard:
    from surfdiff_core.evaluate.cost import total_cost
    from surfdiff_core.stages import rss, train
    from surfdiff_core.stages.common import open_study_store, training_system
    from surfdiff_core.store.models import file_sha256
    from surfdiff_core.system_build import resolve_lattice

    with open_study_store(cfg) as store:
        if not skip_rss:
            r = rss.run(cfg, store)
            print(f"RSS: {r.done} new, {r.skipped} reused", flush=True)
        res = train.run(cfg, store)
        system = training_system(cfg)
        # every RSS relaxation the data cost, failed and out-of-box ones too (they were spent)
        docs = list(store.find({"study": cfg.name, "source": "rss", "system_id": system.system_id,
                                "energy_model": res.energy_models[0]}))
    lattice = cfg.substrate.lattice_constant
    lattice = float(lattice if lattice != "auto" else (resolve_lattice(cfg) or {})["a"])
    folder = SHIPPED_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.pt"):
        old.unlink()

    def export(model_id: str, checkpoint: str, role: str) -> ShippedCheckpoint:
        dest = folder / f"{model_id}.pt"
        strip(checkpoint, dest)
        ck = torch.load(dest, map_location="cpu", weights_only=True)
        return ShippedCheckpoint(file=dest.name, model_id=model_id, sha256=file_sha256(dest), role=role,
                                 best_val=float(ck["best_val"]))

    main = export(res.model_id, res.checkpoint, "model")
    from surfdiff_core.stages.common import model_registry

    with model_registry(cfg) as registry:
        members = [export(mid, registry.get(mid).checkpoint, "member") for mid in res.committee]
    cost = total_cost(docs)
    from ase.data import chemical_symbols

    ck = torch.load(folder / main.file, map_location="cpu", weights_only=True)
    card = ModelCard(
        name=name, description=description, energy_model=res.energy_models[0],
        elements=[chemical_symbols[z] for z in ck["spec"]["elements"]],
        system=CardSystem(element=cfg.substrate.element, facet=cfg.substrate.facet, layers=cfg.substrate.layers,
                          lattice_constant=round(lattice, 6), z_min=cfg.confinement.z_min,
                          z_max=cfg.confinement.z_max, training_system_id=system.system_id),
        model=cfg.model.model_dump(mode="json"), train=cfg.train.model_dump(mode="json"),
        training_data={"study": cfg.name, "cell": str(cfg.rss.cell), "compositions": list(cfg.rss.compositions),
                       "structures": len(docs), "used": len(res.training_doc_ids), "n_train": res.n_train,
                       "n_val": res.n_val,
                       "relaxer": {"fmax": cfg.rss.fmax, "steps": cfg.rss.steps, "optimizer": cfg.rss.optimizer},
                       **cost.as_dict()},
        epochs=res.epochs, validation=best_validation(res.history), checkpoint=main, committee=members,
        built=built_record())
    write_card(card)
    return card


def cpu_name() -> str:
    from surfdiff_core.ml.kernel_report import cpu_info

    return cpu_info()[0]


def built_record() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.node()}, {cpu_name()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}


def measure_config(cfg, target: str, n: int, budget: int, rss_budget: int):
    from surfdiff_core.config import SampleTarget

    composition, cell = target.split(" ", 1)
    targets = [SampleTarget(cell=cell, composition=composition)]
    cfg = cfg.model_copy(update={
        "name": f"{cfg.name}-measure", "sample": cfg.sample.model_copy(update={"targets": targets, "sweep": None,
                                                                              "n": n}),
        "evaluate": cfg.evaluate.model_copy(update={"budget": budget, "rss_budget": rss_budget})})
    return cfg, targets


def rss_arm_ahead(cfg, target: str, rss_budget: int) -> None:
    """The measurement's RSS arm alone (it needs no model): run it while the model trains."""
    from surfdiff_core.stages import baseline
    from surfdiff_core.stages.common import open_study_store

    cfg, targets = measure_config(cfg, target, 1, 1, rss_budget)
    with open_study_store(cfg) as store:
        docs = baseline.arm_documents(store, baseline.run(cfg, store, targets[:1], progress=True).doc_ids)
    print(f"RSS arm of {target}: {len(docs)} relaxations, best {min(d.energy for d in docs):.4f} eV")


def measure(cfg, card: ModelCard, target: str, n: int, budget: int, rss_budget: int) -> dict:
    """Sample `target` with the shipped model directly (no training), relax the best `budget` with the oracle
    and compare with `rss_budget` RSS relaxations in that cell."""
    from surfdiff_core.stages import evaluate, sample
    from surfdiff_core.stages.common import open_study_store

    cfg, targets = measure_config(cfg, target, n, budget, rss_budget)
    with open_study_store(cfg) as store:
        sampled = sample.run(cfg, store, targets=targets, model_id=card.name)
        result = evaluate.run(cfg, store, sampled, targets=targets)
    row, t = result.rows()[0], sampled.targets[0]
    return {"target": target, "samples": t.n, "valid": t.n_valid, "validity": round(t.n_valid / max(t.n, 1), 3),
            "unique": row["unique"], "budget": budget, "rss_budget": rss_budget,
            "best_surfdiff_eV": row["best_generative_eV"], "best_rss_eV": row["best_rss_eV"],
            "reached": row["generative_to_reach_rss_best"] is not None,
            "generative_to_reach": row["generative_to_reach_rss_best"],
            "rss_expected_to_reach": row["rss_expected_to_reach"], "ratio_relaxations": row["speedup"],
            "ratio_atom_weighted": row["speedup_atom_weighted"], "one_target_all_in": row["one_target_all_in"],
            "median_steps": [row["steps_generative_median"], row["steps_rss_median"]],
            "mlff_rank_correlation": row["mlff_rank_correlation"], "measured": built_record()}


def write_card(card: ModelCard) -> None:
    folder = SHIPPED_DIR / card.name
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=1) + "\n")
    (folder / "card.md").write_text(card_markdown(card))


def card_markdown(card: ModelCard) -> str:
    s, d, v = card.system, card.training_data, card.validation
    lines = [f"# {card.name}\n", card.description + "\n",
             "| | |", "|---|---|",
             f"| system | {s.element}({s.facet}), {s.layers} layers, a = {s.lattice_constant:.4f} Å; overlayer box "
             f"{s.z_min:g}–{s.z_max:g} Å above the top layer |",
             f"| elements | {', '.join(card.elements)} |",
             f"| energy model | {card.energy_model} |",
             f"| training data | {d['structures']} RSS relaxations in {d['cell']} of {', '.join(d['compositions'])}, "
             f"{d['used']} of them used (failed, out-of-box and above the energy window left out; with periodic "
             f"tiles {d['n_train']} train / {d['n_val']} validation); all {d['structures']} charged: "
             f"{d['force_calls']:.0f} oracle force calls, "
             f"{d['atom_force_calls']:.4g} atom-weighted |",
             f"| model | PaiNN {card.model['n_features']} features × {card.model['n_interactions']} interactions, "
             f"cutoff {card.model['cutoff']} Å; MLFF committee of {1 + len(card.committee)} |",
             f"| training | {card.epochs} epochs (best at {v.get('epoch', 0):.0f}) |",
             f"| validation (best epoch) | score {v.get('score', float('nan')):.4f}, forces "
             f"{v.get('forces', float('nan')):.4f}, energy {v.get('energy', float('nan')):.4f} (normalised losses) |",
             ""]
    m = card.discovery
    if m:
        def g(x) -> str:
            return "-" if x is None else f"{x:.3g}"

        reached = (f"RSS's best reached at relaxation {m['generative_to_reach']} (RSS expects "
                   f"{g(m['rss_expected_to_reach'])}): {g(m['ratio_relaxations'])}× fewer relaxations, "
                   f"{g(m['ratio_atom_weighted'])}× atom-weighted" if m["reached"] else
                   "RSS's best not reached (within 0.05 eV)")
        lines += ["## Measured with it (no training: the shipped model sampled directly)\n",
                  f"{m['target']}: {m['valid']} of {m['samples']} samples valid ({m['validity']:.0%}), "
                  f"uniqueness {m['unique']}; the best {m['budget']} distinct in MLFF rank order relaxed with "
                  f"{card.energy_model}: best {m['best_surfdiff_eV']} eV against RSS's {m['best_rss_eV']} eV in "
                  f"{m['rss_budget']} relaxations in that cell; {reached}; one-target all-in (the whole training "
                  f"data charged to this one target): {g(m.get('one_target_all_in'))}×; median BFGS steps "
                  f"{m['median_steps'][0]} vs {m['median_steps'][1]}; MLFF/oracle rank correlation "
                  f"{m['mlff_rank_correlation']}.\n",
                  f"Measured {m['measured']['date']} on {m['measured']['machine']}: `{m['measured']['command']}`\n"]
    b = card.built
    files = "\n".join(f"- `{e.file}` ({e.role}) sha256 `{e.sha256}`" for e in (card.checkpoint, *card.committee))
    lines += ["## Checkpoints\n", files, "",
              f"Built {b.get('date')} at commit {b.get('commit', '')[:12]} on {b.get('machine')}: `{b.get('command')}`",
              ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the recipe (configs/pretrained/*.yaml)")
    p.add_argument("--name", required=True, help="the shipped model's name (its folder)")
    p.add_argument("--description", default="", help="one sentence for the card")
    p.add_argument("--workdir", default="benchmarks/pretrained/work", help="stores and checkpoints of the build")
    p.add_argument("--store", default=None, metavar="PATH", help="the build's store (default WORKDIR/<study>/store)")
    p.add_argument("--rss-n", type=int, default=None, help="RSS structures (default rss.n of the recipe)")
    p.add_argument("--skip-rss", action="store_true", help="train on the RSS data already in the store")
    p.add_argument("--measure", action="store_true", help="measure the shipped model instead of building it")
    p.add_argument("--card-only", action="store_true", help="rewrite card.md from card.json, run nothing")
    p.add_argument("--rss-arm-ahead", action="store_true", help="run only the measurement's RSS arm")
    p.add_argument("--target", default="Ag12O6 p(4x4)", help="'COMPOSITION CELL' to measure in")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--rss-budget", type=int, default=32)
    a = p.parse_args()
    workdir = Path(a.workdir).resolve()
    cfg = study_config(a.config, workdir, a.store)
    if a.rss_n is not None:
        cfg = cfg.model_copy(update={"rss": cfg.rss.model_copy(update={"n": a.rss_n})})
    if a.card_only:
        from surfdiff_core.pretrained import find_shipped

        write_card(find_shipped(a.name))
        return 0
    if a.rss_arm_ahead:
        rss_arm_ahead(cfg, a.target, a.rss_budget)
        return 0
    if a.measure:
        from surfdiff_core.pretrained import find_shipped

        card = find_shipped(a.name)
        if card is None:
            p.error(f"no shipped model {a.name!r}: build it first")
        card.discovery = measure(cfg, card, a.target, a.samples, a.budget, a.rss_budget)
        write_card(card)
    else:
        card = train_and_export(cfg, a.name, a.description, skip_rss=a.skip_rss)
    print(card.describe())
    print(f"card: {SHIPPED_DIR / a.name / 'card.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
