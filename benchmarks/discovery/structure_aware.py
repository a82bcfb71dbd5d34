"""Structure-aware generation (issue #24) measured against the shipped arm, with the shipped EMT model.

Every arm samples with the shipped pretrained model `emt-ag111-o` (no training; sampling seed = the run seed)
in the system of configs/pretrained/emt-ag111-o.yaml, and the evaluation stage relaxes its best `--budget`
distinct samples per target with EMT against one shared RSS arm per target (`--rss-budget` relaxations in the
target cell, fixed `evaluate.seed`, baseline study `structure-aware-rss`). Arms: `em` (the shipped default),
`pc`, `ffc`, `ode`, `ddim` (samplers), `em+novelty` (sample.novelty = `--novelty`, sampled in the em arm's
study after its evaluation: novelty guidance pushes away from the minima the sampling study already holds for
the target, i.e. the em arm's relaxed minima; em runs first whenever it is asked for), `seeded` (seed_structure
= the RSS arm's best structure, t0 = `--t0`) and `inpaint` (half of the overlayer of RSS's best structure fixed,
a random half by numpy's default_rng(seed); the rest regenerated; how many relaxations fall into its basin).

    .venv/bin/python benchmarks/discovery/structure_aware.py --seeds 21 22 23 --seed-role report

Hygiene as benchmarks/discovery/sweep.py: every seed's role named; one store `<out>/stores/all` for every arm
and seed (each arm × seed its own study); one record per seed-run appended to `<out>/runs.jsonl` (never
rewritten), `<out>/REPORT.md` regenerated from it (structure_aware_report.py); a rerun resumes from the store.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from structure_aware_report import write_report  # noqa: E402
from sweep import git_commit, host, recorded_run  # noqa: E402
from sweep_settings import with_removed_keys  # noqa: E402

from surfdiff_core.config import SampleConfig, SampleTarget, SurfdiffConfig, config_from_dict, load_config  # noqa: E402
from surfdiff_core.errors import SurfdiffError  # noqa: E402
from surfdiff_core.stages import baseline, evaluate, sample  # noqa: E402
from surfdiff_core.stages.common import open_study_store  # noqa: E402
from surfdiff_core.store import ResultsStore, StructureDoc  # noqa: E402

CONFIG = ROOT / "configs" / "pretrained" / "emt-ag111-o.yaml"
MODEL = "emt-ag111-o"
NAME = "structure-aware"
ARMS = ("em", "pc", "ffc", "ode", "ddim", "em+novelty", "seeded", "inpaint")
BASIN_TOL = 0.05  # eV: the inpainting basin (and StructureMatcher-equal)
NOT_SETTINGS = {"seeds", "seed_role", "out", "report_only", "arms"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--seed-role", choices=["dev", "report"],
                   help="dev: seeds used while developing; report: seeds for the headline (required)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--targets", nargs="+", default=["Ag12O6 p(4x4)", "Ag6O3 p(3x3)"],
                   help='"COMPOSITION CELL" each')
    p.add_argument("--samples", type=int, default=64, help="samples per target and arm (sample.n)")
    p.add_argument("--steps", type=int, help="diffusion steps (default: the config's)")
    p.add_argument("--budget", type=int, default=16, help="oracle relaxations per target and arm")
    p.add_argument("--rss-budget", type=int, default=64, help="RSS relaxations in every target cell")
    p.add_argument("--novelty", type=float, default=1.0, help="sample.novelty of the em+novelty arm (Å²)")
    p.add_argument("--t0", type=float, default=0.3, help="sample.t0 of the seeded arm")
    p.add_argument("--rss-arm-seed", type=int, default=7919, help="evaluate.seed: one RSS arm per target")
    p.add_argument("--out", help=f"default benchmarks/discovery/{NAME}-emt")
    p.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from runs.jsonl, run nothing")
    args = p.parse_args(argv)
    if not args.report_only and not (args.seeds and args.seed_role):
        p.error("--seeds and --seed-role required (benchmark hygiene: name every seed's role)")
    return args


def parse_target(text: str) -> SampleTarget:
    try:
        composition, cell = text.split()
    except ValueError:
        raise SurfdiffError(f"target {text!r}: give it as \"COMPOSITION CELL\", e.g. \"Ag6O3 p(3x3)\"") from None
    return SampleTarget(cell=cell, composition=composition)


def run_order(arms: list[str]) -> list[str]:
    """The arms in ARMS order; em+novelty needs the em arm's minima, so em runs (and is recorded) with it."""
    wanted = set(arms) | ({"em"} if "em+novelty" in arms else set())
    return [a for a in ARMS if a in wanted]


def study_name(seed: int, arm: str) -> str:
    return f"{NAME}-s{seed}-{'em' if arm == 'em+novelty' else arm}"


def study_config(args: argparse.Namespace, base: dict, seed: int, arm: str, store: Path | str) -> dict:
    d = copy.deepcopy(base)
    d["name"] = study_name(seed, arm)
    d["sample"].update(n=args.samples, seed=seed, targets=[parse_target(t).model_dump(mode="json")
                                                           for t in args.targets])
    if args.steps:
        d["sample"]["steps"] = args.steps
    d["evaluate"].update(budget=args.budget, rss_budget=args.rss_budget, seed=args.rss_arm_seed,
                         rss_study=f"{NAME}-rss")
    d["store"] = {**d["store"], "backend": "sqlite", "path": str(store)}
    return d


def settings_id(args: argparse.Namespace, base: dict) -> str:
    what = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    return hashlib.sha1(json.dumps([what, with_removed_keys(base)], sort_keys=True,
                                   default=str).encode()).hexdigest()[:12]


def model_evaluations(scfg: SampleConfig, process) -> int:
    """Denoiser evaluations per sample (each batch's structures share them): one per step for em, ddim and
    novelty; Heun's two for ode; 1 + corrector_steps for pc; ffc's corrector steps only where t <= t_max;
    RePaint's `resample` per step; a seeded run's steps from t0 (diffusion/seeded.py)."""
    from surfdiff_core.diffusion.seeded import seeded_steps

    s = scfg.steps
    if scfg.seed_structure is not None:
        return seeded_steps(s, scfg.t0, process.t_min)
    if scfg.inpaint is not None:
        return scfg.inpaint.resample * s
    if scfg.sampler == "pc":
        return (1 + scfg.corrector_steps) * s
    if scfg.sampler == "ffc":
        late = sum(t <= scfg.corrector_t_max for t in process.time_grid(s)[1:])
        return s + scfg.corrector_steps * late
    return 2 * s if scfg.sampler == "ode" else s


def minima_metrics(store: ResultsStore, ids: list[str], tol: float) -> dict:
    """Distinct relaxed minima among the arm's relaxations (StructureMatcher on the slab; beside it, energies
    more than `tol` apart), per 100 relaxations and per 10⁴ oracle force calls (steps + 1 per relaxation)."""
    from surfdiff_core.evaluate.cost import can_hit, total_cost
    from surfdiff_core.evaluate.matching import unique_groups

    docs = list(store.find({"doc_id": {"$in": ids}})) if ids else []
    ok = [d for d in docs if can_hit(d)]
    groups = unique_groups(ok) if ok else []
    energies = sorted(d.energy for d in ok)
    levels = (1 + int(np.sum(np.diff(energies) > tol))) if energies else 0
    calls = total_cost(docs).force_calls
    n = len(ids)
    return {"relaxations": n, "minima": len(ok), "distinct_minima": len(groups), "distinct_energies": levels,
            "force_calls": calls, "unique_per_100": 100 * len(groups) / n if n else None,
            "unique_per_1e4_calls": 1e4 * len(groups) / calls if calls else None}


def rss_best(cfg: SurfdiffConfig, store: ResultsStore, target: SampleTarget, progress: bool) -> StructureDoc:
    from surfdiff_core.evaluate.cost import can_hit

    arm = baseline.run(cfg, store, [target], progress=progress)
    docs = [d for d in baseline.arm_documents(store, arm.doc_ids) if can_hit(d)]
    if not docs:
        raise SurfdiffError(f"{target.composition} {target.cell}: the RSS arm has no finished minimum")
    return min(docs, key=lambda d: (d.energy, d.doc_id))


def inpaint_source(out: Path, ref: StructureDoc, seed: int) -> tuple[Path, list[int]]:
    """RSS's best structure as a file, and a random half of its overlayer (default_rng(seed)) to hold fixed:
    overlayer indices counted after the substrate, as sample.inpaint.indices reads them."""
    from ase.io import write

    n_over = len(ref.movable) - ref.n_substrate
    if n_over < 2:
        raise SurfdiffError(f"{ref.composition}: {n_over} overlayer atom(s), no half to regenerate")
    fixed = sorted(int(i) for i in np.random.default_rng(seed).choice(n_over, n_over // 2, replace=False))
    path = out / "inpaint" / f"{ref.doc_id}.extxyz"
    if not path.is_file():  # its content is part of the samples' ids: written once
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, ref.to_atoms(), format="extxyz")
    return path, fixed


def recovery(store: ResultsStore, ids: list[str], ref: StructureDoc) -> dict:
    """Relaxations that fall into the reference's basin: within BASIN_TOL eV of it and StructureMatcher-equal."""
    from surfdiff_core.evaluate.cost import can_hit
    from surfdiff_core.evaluate.matching import slabs_match

    ref_atoms = ref.to_atoms()
    docs = list(store.find({"doc_id": {"$in": ids}})) if ids else []
    hits = [d for d in docs if can_hit(d) and abs(d.energy - ref.energy) <= BASIN_TOL
            and slabs_match(d.to_atoms(), ref_atoms)]
    return {"reference": ref.doc_id, "reference_eV": ref.energy, "recovered": len(hits),
            "recovered_fraction": len(hits) / len(ids) if ids else None}


def arm_settings(args: argparse.Namespace, arm: str, out: Path, ref: StructureDoc | None, seed: int) -> dict:
    if arm in ("pc", "ffc", "ode", "ddim"):
        return {"sampler": arm}
    if arm == "em+novelty":
        return {"novelty": args.novelty}
    if arm == "seeded":
        return {"seed_structure": ref.doc_id, "t0": args.t0}
    if arm == "inpaint":
        path, fixed = inpaint_source(out, ref, seed)
        return {"inpaint": {"source": str(path), "indices": fixed}}
    return {}


def arm_target(args: argparse.Namespace, cfg: SurfdiffConfig, store: ResultsStore, arm: str, target: SampleTarget,
               seed: int, out: Path, process, em_rows: dict[str, dict]) -> dict:
    """Sample one target with one arm, evaluate it, and measure it."""
    from surfdiff_core.evaluate.cost import can_hit
    from surfdiff_core.evaluate.matching import novel_mask, unique_groups

    progress = sys.stderr.isatty()
    key = f"{target.composition} {target.cell}"
    ref = rss_best(cfg, store, target, progress) if arm in ("seeded", "inpaint") else None
    settings = arm_settings(args, arm, out, ref, seed)
    scfg = SampleConfig.model_validate({**cfg.sample.model_dump(mode="json"), **settings})
    t0 = time.perf_counter()
    res = sample.run(cfg, store, targets=[target], scfg=scfg, model_id=MODEL, progress=progress)
    ev = evaluate.run(cfg, store, res, targets=[target], progress=progress)
    t, row, samples = ev.targets[0], ev.rows()[0], res.targets[0]
    tol = cfg.evaluate.tol
    gen = list(store.find({"doc_id": {"$in": samples.doc_ids}}))
    rec = {"target": key, "settings": settings, "samples": samples.n, "valid": samples.n_valid,
           "distinct_samples": t.n_distinct, "model_evaluations_per_sample": model_evaluations(scfg, process),
           "mlff_relax_steps_median": float(np.median([d.steps or 0 for d in gen])) if gen else None,
           "best_generative_eV": row["best_generative_eV"], "best_rss_eV": row["best_rss_eV"],
           "reached": row["generative_to_reach_rss_best"] is not None,
           "generative_to_reach": row["generative_to_reach_rss_best"],
           "rss_expected_to_reach": row["rss_expected_to_reach"], "ratio_relaxations": row["speedup"],
           "ratio_atom_weighted": row["speedup_atom_weighted"], "one_target_all_in": row["one_target_all_in"],
           **minima_metrics(store, t.relaxed_ids, tol), "relaxed_ids": t.relaxed_ids, "cost": t.cost,
           "training_cost": ev.all_in.get("training")}
    if arm == "em+novelty":
        em_ids = em_rows.get(key, {}).get("relaxed_ids", [])
        known = [d for d in store.find({"doc_id": {"$in": em_ids}}) if can_hit(d)] if em_ids else []
        ours = [d for d in store.find({"doc_id": {"$in": t.relaxed_ids}}) if can_hit(d)] if t.relaxed_ids else []
        mine = [g[0] for g in unique_groups(ours)] if ours else []
        both = minima_metrics(store, [*em_ids, *t.relaxed_ids], tol)
        rec["novelty"] = {"known_minima": (gen[0].meta.get("novelty") or {}).get("minima") if gen else None,
                          "new_vs_known": int(sum(novel_mask(mine, known))) if mine else 0,
                          "with_em": {k: both[k] for k in ("relaxations", "distinct_minima", "unique_per_100")}}
    if arm == "inpaint":
        rec["inpaint"] = {**recovery(store, t.relaxed_ids, ref), "fixed_overlayer_indices": settings["inpaint"]
                          ["indices"], "overlayer_atoms": len(ref.movable) - ref.n_substrate}
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


def run_seed(args: argparse.Namespace, base: dict, seed: int, out: Path, process) -> dict:
    """Every arm (run order) × target of one seed; an arm's failure on a target (one line) is recorded there."""
    store_path = out / "stores" / "all"
    arms: dict[str, dict] = {}
    targets = [parse_target(t) for t in args.targets]
    with open_study_store(config_from_dict(study_config(args, base, seed, "em", store_path))) as store:
        for arm in run_order(args.arms):
            cfg = config_from_dict(study_config(args, base, seed, arm, store_path))
            rows = []
            for k, target in enumerate(targets, 1):
                key = f"{target.composition} {target.cell}"
                try:
                    rows.append(arm_target(args, cfg, store, arm, target, seed, out, process,
                                           {r["target"]: r for r in arms.get("em", {}).get("targets", [])}))
                    r = rows[-1]
                    what = (f"{r['distinct_minima']} distinct minima in {r['relaxations']} relaxations, "
                            f"{'reached' if r['reached'] else 'not reached'} ({r['wall_s']:.0f} s)")
                except SurfdiffError as err:
                    rows.append({"target": key, "error": str(err)[:500]})
                    what = f"error: {err}"
                print(f"[seed {seed}] {arm} {k}/{len(targets)} {key}: {what}", flush=True)
            arms[arm] = {"study": cfg.name, "targets": rows, "all_in": sweep_all_in(rows)}
    return {"arms": arms}


def sweep_all_in(rows: list[dict]) -> dict | None:
    """The arm's all-in over every target (surfdiff_core.evaluate.cost.all_in, as the sweep benchmark): RSS's
    expected cost over the shipped model's training data + Σ the arm's relaxations until each hit; ratios None
    unless every target was reached. None when a target failed."""
    from surfdiff_core.evaluate.cost import ZERO, OracleCost, TargetCost, all_in

    if not rows or any("error" in r or not r.get("cost") for r in rows):
        return None
    training = OracleCost.from_dict(rows[0]["training_cost"]) or ZERO
    return all_in(training, ZERO, [TargetCost.from_dict(r["cost"]) for r in rows]).as_dict()


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out or HERE / f"{NAME}-emt")
    if args.report_only:
        if not (out / "runs.jsonl").is_file():
            sys.exit(f"error: no runs to report in {out}: run the benchmark first")
        return write_report(out)
    try:
        base = load_config(CONFIG).model_dump(mode="json")
        for s in args.seeds:  # every target and config checked before any work
            for arm in run_order(args.arms):
                config_from_dict(study_config(args, base, s, arm, out / "stores" / "all"))
    except SurfdiffError as err:
        sys.exit(f"error: {err}")
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(out)
    try:
        return run_locked(args, argv, base, out)
    finally:
        lock.close()


def hold_lock(out: Path):
    import fcntl

    fh = (out / "run.lock").open("a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        sys.exit(f"error: another structure_aware.py is running into {out}: wait for it, or give another --out")
    return fh


def run_locked(args: argparse.Namespace, argv: list[str], base: dict, out: Path) -> Path:
    from surfdiff_core import pretrained
    from surfdiff_core.train.checkpoint import load_checkpoint

    card = pretrained.find_shipped(MODEL)
    process = load_checkpoint(card.path(card.checkpoint), device="cpu").process
    common = {"argv": [sys.executable, __file__, *argv], "args": vars(args), "git": git_commit(), "host": host(),
              "settings_id": settings_id(args, base), "benchmark": NAME, "model": MODEL,
              "energy_model": base["oracle"]["name"], "arms_run": run_order(args.arms)}
    for seed in args.seeds:
        record = {"run_id": uuid.uuid4().hex[:12], "started": dt.datetime.now().astimezone().isoformat(),
                  "seed": seed, "seed_role": args.seed_role, **common,
                  "study_config": study_config(args, base, seed, "em", out / "stores" / "all")}
        recorded_run(out / "runs.jsonl", record, functools.partial(run_seed, args, base, seed, out, process),
                     functools.partial(write_report, out))
    report = write_report(out)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
