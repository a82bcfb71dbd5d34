"""Why did a sweep target miss RSS's best: generation or ranking? A diagnosis of one finished seed-run.

For a seed-run recorded by sweep.py (its study config, its store), the final model (after active learning) samples
each target again with the run's own sample settings, once per `--relax-steps` value (only the MLFF relaxation
after sampling differs; per target, with the run's sample seed, so every variant starts from the same
diffusion trajectories), and *every* distinct sample is relaxed
with the oracle, not only the evaluation's budget. Per target and variant it prints:

- hits: how many of the samples relax to RSS's best (within evaluate.tol): zero means the samples never reach
  its basin (a generation limit), whatever the ranking;
- first hit: the rank of the first hit in MLFF order (what the evaluation would spend), against the expected
  rank of a random order, (n + 1) / (hits + 1);
- Spearman of MLFF energy against oracle-relaxed energy, and the median oracle BFGS steps from the samples.

`--own-samples` relaxes the run's own evaluation samples instead of drawing new ones (the row's relax steps are
the run's): did the samples the run judged contain RSS's best basin at all, or did the ranking miss it?
`--seeded T0 …` draws around the run's best samples instead (seeded exploration, `sample.seed_structure`): does
local exploration reach a basin that drawing from the prior rarely does?

It works on a copy of the benchmark's store (`--work`), so the benchmark's own studies never see these documents.

    .venv/bin/python benchmarks/discovery/ranking_diagnosis.py --out benchmarks/discovery/sweep-ag111-o-emt \\
        --seed 401 --relax-steps 30 300 --work /tmp/diagnosis

The seed becomes a development seed by being diagnosed: say so where its numbers are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from surfdiff_core.config import SampleTarget, config_from_dict  # noqa: E402
from surfdiff_core.errors import SurfdiffError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the sweep benchmark's folder (runs.jsonl, stores/all)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--rerun", default="", help="the seed-run's rerun tag (default: the untagged run)")
    p.add_argument("--relax-steps", type=int, nargs="+", default=[30, 300],
                   help="MLFF relaxation step caps to compare (sample.relax_steps)")
    p.add_argument("--samples", type=int, help="guided samples per target (default: the run's sample.n): does "
                   "drawing more reach the basin RSS found?")
    p.add_argument("--own-samples", action="store_true", help="relax every one of the run's own evaluation "
                   "samples (no new draws; --relax-steps and --samples do not apply)")
    p.add_argument("--seeded", type=float, nargs="+", metavar="T0", help="seeded exploration instead: the run's "
                   "best distinct samples (MLFF order) noised to each t0 and denoised again (no other variant runs)")
    p.add_argument("--seeds-from", type=int, default=8, help="with --seeded: how many of the run's best samples")
    p.add_argument("--per-seed", type=int, default=16, help="with --seeded: samples drawn from each")
    p.add_argument("--targets", nargs="*", help="'COMPOSITION CELL' pairs, e.g. 'Ag6O4 p(4x4)' (default: all)")
    p.add_argument("--work", required=True, help="a folder for the store copy (created; reused when it exists)")
    return p.parse_args(argv)


def finished_record(out: Path, seed: int, rerun: str) -> dict:
    runs = out / "runs.jsonl"
    if not runs.is_file():
        raise SurfdiffError(f"no runs.jsonl in {out}")
    found = [r for r in map(json.loads, runs.read_text().splitlines()) if r.get("seed") == seed
             and (r.get("rerun") or "") == rerun and r.get("status") == "finished"]
    if not found:
        raise SurfdiffError(f"no finished run of seed {seed}{f' rerun {rerun}' if rerun else ''} in {runs}")
    return found[-1]


def working_store(out: Path, work: Path) -> Path:
    """A copy of the benchmark's store and its checkpoints (the stages find finished models there)."""
    for name in ("checkpoints", "all"):  # the store last: a copy interrupted before it is redone whole
        if not (work / name).exists():
            shutil.copytree(out / "stores" / name, work / f"{name}.partial")
            (work / f"{name}.partial").rename(work / name)
    return work / "all"


def own_samples(cfg, store, model, target: SampleTarget) -> list:
    """The samples the run's evaluation judged: its sample stage's documents for the final model."""
    from surfdiff_core.stages.common import target_system
    from surfdiff_core.stages.evaluate import generated_docs
    from surfdiff_core.stages.sample import resolve_model

    record = resolve_model(cfg, model)
    return generated_docs(cfg, store, target_system(cfg, target), None, record.model_id, None,
                          tuple(record.committee))


def seeded_samples(cfg, store, model, target: SampleTarget, t0: float, seeds_from: int, per_seed: int) -> list:
    """Seeded exploration around the run's best: each of its `seeds_from` best distinct samples (MLFF order) noised
    to `t0` and denoised `per_seed` times (sample.seed_structure), then MLFF-relaxed as the run's samples were."""
    from surfdiff_core.evaluate.matching import deduplicate
    from surfdiff_core.stages import sample

    own = [d for d in own_samples(cfg, store, model, target) if d.valid and d.in_box and d.energy is not None]
    drawn = []
    for i, seed in enumerate(deduplicate(sorted(own, key=lambda d: (d.energy, d.doc_id)))[:seeds_from]):
        scfg = cfg.sample.model_copy(update={"share_batches": False, "seed_structure": seed.doc_id, "t0": t0,
                                             "n": per_seed, "seed": cfg.sample.seed + 1000 + i})
        ids = sample.run(cfg, store, model, targets=[target], scfg=scfg, progress=False).doc_ids
        drawn += store.find({"doc_id": {"$in": ids}})
    return drawn


def diagnose_target(cfg, store, model, target: SampleTarget, variant: dict, samples: int | None = None) -> dict:
    """One variant's samples of `target`, every one relaxed with the oracle. `variant`: {"own": True} the run's
    own samples (own_samples); {"steps": N} new draws with that MLFF relaxation cap; {"t0": T, "seeds_from": K,
    "per_seed": M} seeded exploration (seeded_samples)."""
    from surfdiff_core.evaluate.budget import mlff_rank_correlation, ranked_relaxations
    from surfdiff_core.evaluate.cost import can_hit
    from surfdiff_core.evaluate.matching import deduplicate
    from surfdiff_core.oracles import get_calculator
    from surfdiff_core.stages import baseline, sample
    from surfdiff_core.stages.common import target_system
    from surfdiff_core.stages.oracle_relax import relax_samples

    if variant.get("own"):
        drawn = own_samples(cfg, store, model, target)
    elif "t0" in variant:
        drawn = seeded_samples(cfg, store, model, target, variant["t0"], variant["seeds_from"], variant["per_seed"])
    else:
        update = {"relax_steps": variant["steps"], "share_batches": False} | ({"n": samples} if samples else {})
        scfg = cfg.sample.model_copy(update=update)
        ids = sample.run(cfg, store, model, targets=[target], scfg=scfg, progress=False).doc_ids
        drawn = list(store.find({"doc_id": {"$in": ids}}))
    system = target_system(cfg, target)
    docs = [d for d in drawn if d.valid and d.in_box and d.energy is not None]
    distinct = deduplicate(sorted(docs, key=lambda d: (d.energy, d.doc_id)))
    calculator = get_calculator(cfg.oracle.name, **cfg.oracle.settings)
    # the evaluation's own ranking (parents' MLFF energy) and rank correlation, over the relaxations that count
    relaxed = [d for d in relax_samples(cfg, store, system, distinct, calculator, tag="evaluate", progress=False)
               if can_hit(d)]
    ranked = ranked_relaxations(distinct, relaxed)
    arm = baseline.run(cfg, store, targets=[target], progress=False).targets[0]
    best = min(d.energy for d in store.find({"doc_id": {"$in": arm.doc_ids}}) if can_hit(d))
    oracle = np.array([d.energy for d in ranked])
    hit = oracle <= best + cfg.evaluate.tol
    first = int(np.nonzero(hit)[0][0]) + 1 if hit.any() else None
    rho = mlff_rank_correlation(distinct, relaxed)
    seeded = {k: variant[k] for k in ("t0", "seeds_from", "per_seed")} if "t0" in variant else None
    return {"target": f"{target.composition} {target.cell}",
            "relax_steps": variant.get("steps", cfg.sample.relax_steps), "own_samples": bool(variant.get("own")),
            "seeded": seeded, "samples": len(docs),
            "distinct": len(distinct), "relaxed": len(ranked), "hits": int(hit.sum()), "first_hit": first,
            "random_expected": round((len(ranked) + 1) / (int(hit.sum()) + 1), 1),
            "spearman": None if rho is None else round(rho, 3),
            "oracle_steps_median": float(np.median([r.steps or 0 for r in ranked])) if ranked else None,
            "best_eV": round(float(oracle.min()), 4) if len(oracle) else None, "rss_best_eV": round(best, 4)}


def variants(args: argparse.Namespace) -> list[dict]:
    if args.own_samples:
        return [{"own": True}]
    if args.seeded:
        return [{"t0": t0, "seeds_from": args.seeds_from, "per_seed": args.per_seed} for t0 in args.seeded]
    return [{"steps": s} for s in args.relax_steps]


def variant_text(row: dict) -> str:
    if row.get("own_samples"):
        return f"{row['relax_steps']} (the run's own samples)"
    if row.get("seeded"):
        s = row["seeded"]
        return f"{row['relax_steps']} (seeded: best {s['seeds_from']} at t0 {s['t0']}, {s['per_seed']} each)"
    return str(row["relax_steps"])


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    try:
        record = finished_record(out, args.seed, args.rerun)
    except SurfdiffError as err:
        sys.exit(f"error: {err}")
    from surfdiff_core.stages import active, rss, train
    from surfdiff_core.stages.common import open_study_store, sample_targets

    work.mkdir(parents=True, exist_ok=True)
    data = record["study_config"]
    data["store"] = {**data["store"], "path": str(working_store(out, work))}
    for moved in ("guidance_samples", "steps_sweep"):  # recorded before they moved to ablations.py (always off)
        data.get("evaluate", {}).pop(moved, None)
    try:
        cfg = config_from_dict(data)
    except SurfdiffError as err:
        sys.exit(f"error: seed {args.seed}'s recorded config: {err}")
    targets = sample_targets(cfg)
    if args.targets:
        wanted = {tuple(t.split()) for t in args.targets}
        targets = [t for t in targets if (t.composition, t.cell) in wanted]
        if not targets:
            sys.exit(f"error: none of {args.targets} is a target of seed {args.seed}'s study")
    rows = []
    with open_study_store(cfg) as store:
        # every stage resumes from the copied store: this only finds the run's final model
        model = active.run(cfg, store, train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False),
                           progress=False).model
        for variant in variants(args):
            for target in targets:
                row = diagnose_target(cfg, store, model, target, variant, args.samples)
                rows.append(row)
                print(json.dumps(row), flush=True)
    path = fresh_diagnosis_path(out / "diagnosis", f"seed{args.seed}{f'-{args.rerun}' if args.rerun else ''}")
    head = "| target | MLFF relax steps | relaxed | hits | first hit (MLFF order) | random order | Spearman | " \
           "oracle steps (median) | best / RSS best (eV) |"
    lines = [f"# Ranking diagnosis of seed {args.seed} (run {record['run_id']})\n",
             f"Command: `{' '.join(['benchmarks/discovery/ranking_diagnosis.py', *(argv or sys.argv[1:])])}`, "
             f"{dt.datetime.now().isoformat(timespec='minutes')}. This seed is a development seed from now on.\n",
             head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['target']} | {variant_text(r)} | {r['relaxed']} | {r['hits']} | {r['first_hit'] or '-'} | "
                     f"{r['random_expected']} | {r['spearman']} | {r['oracle_steps_median']} | "
                     f"{r['best_eV']} / {r['rss_best_eV']} |")
    path.write_text("\n".join(lines) + "\n")
    (path.with_suffix(".json")).write_text(json.dumps({"record": record["run_id"], "rows": rows}, indent=1))
    mark_diagnosed(out, record, path, argv)
    print(f"diagnosis: {path}")
    return path


def fresh_diagnosis_path(folder: Path, stem: str) -> Path:
    """A report path no earlier diagnosis holds: two within one second must not overwrite each other's file or
    share a run id in the history."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{stem}-{stamp}.md", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{stamp}-{n}.md"
    return path


def mark_diagnosed(out: Path, record: dict, path: Path, argv: list[str] | None) -> None:
    """The history says so: a `diagnosed` record with role dev, so the report keeps the seed out of its headline
    from now on (sweep_report counts every seed that has a dev record as a development seed)."""
    from sweep import append_record

    now = dt.datetime.now().astimezone().isoformat()
    append_record(out / "runs.jsonl", {
        "run_id": f"{record['run_id']}-diagnosis-{path.stem}", "started": now, "ended": now, "seed": record["seed"],
        "seed_role": "dev", "rerun": record.get("rerun", ""), "status": "diagnosed",
        "argv": [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
        "settings_id": record.get("settings_id"), "diagnosis": str(path.relative_to(out))})


if __name__ == "__main__":
    main()
