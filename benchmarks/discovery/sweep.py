"""Sweep benchmark: one model (and its MLFF committee) serves every target of a sweep; every oracle call counted.

Per seed: RSS training data in the config's training cell, train, active learning over the sweep (labels from
every target fine-tune the one model), guided samples of every target, then the evaluation: per target the
best distinct samples in MLFF rank order against `--rss-budget` RSS relaxations in the target cell. The
headline is the sweep's all-in ratio: RSS's expected atom-weighted oracle force calls to reach every target's
RSS best over surfdiff's, training data and every active-learning call included.

    .venv/bin/python benchmarks/discovery/sweep.py --config configs/sweep-ag111-o.yaml --energy-model emt \\
        --seeds 11 12 13 14 15 --seed-role report --rss-arm-ahead

Hygiene: seeds are named `dev` (used while developing) or `report` (for the headline) on every invocation.
All seeds share one RSS arm per target (one `evaluate.seed`, one baseline study `evaluate.rss_study`) in one
store, `<out>/stores/all`; each seed is its own study, so seeds never see each other's training data. Every
seed-run appends one record to `<out>/runs.jsonl` (never rewritten); `<out>/REPORT.md` is regenerated from it.
A rerun of a finished seed resumes from the store and repeats its numbers; `--rerun TAG` runs it again from
scratch under new study names (the RSS arms still shared) to measure the spread between reruns. The store is not
committed; the RSS arms are (`<out>/rss-arms/`, see sweep_state.py), so a new machine relaxes none of them again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from sweep_report import write_report  # noqa: E402
from sweep_settings import settings_hash  # noqa: E402
from sweep_state import arms_file, load_arms, save_arms  # noqa: E402

from surfdiff_core.cells import cell_label  # noqa: E402
from surfdiff_core.config import config_from_dict, load_config  # noqa: E402
from surfdiff_core.errors import ConfigError, SurfdiffError  # noqa: E402
from surfdiff_core.ml.message_op import message_op_unavailable_reason  # noqa: E402
from surfdiff_core.stages import active, evaluate, rss, sample, train  # noqa: E402
from surfdiff_core.stages.common import open_study_store, sample_targets  # noqa: E402

ENERGY_MODELS = ("emt", "chgnet", "sevennet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a study config with sample.sweep and/or sample.targets (its sections are "
                   "the defaults)")
    p.add_argument("--energy-model", choices=ENERGY_MODELS, default=None,
                   help="oracle and relax method (default: the config's oracle)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--seed-role", choices=["dev", "report"],
                   help="dev: seeds used while developing; report: seeds for the headline (required)")
    p.add_argument("--rerun", default="", help="run the seeds again from scratch under study names tagged with "
                   "this (the RSS arms stay shared): the spread between reruns")
    size = p.add_argument_group("sizes (default: the config's)")
    size.add_argument("--rss-train", type=int, help="RSS training structures (rss.n)")
    size.add_argument("--epochs", type=int)
    size.add_argument("--samples", type=int, help="guided samples per target (sample.n)")
    size.add_argument("--steps", type=int, help="diffusion steps")
    size.add_argument("--budget", type=int, help="evaluation relaxations per target (evaluate.budget)")
    size.add_argument("--rss-budget", type=int, default=256, help="RSS relaxations in every target cell")
    size.add_argument("--al-rounds", type=int)
    size.add_argument("--al-labels", type=int, help="active-learning relaxations per target and round")
    size.add_argument("--al-budget", type=int, help="active_learning.max_relaxations")
    size.add_argument("--allocation", choices=["uniform", "envelope"], help="active_learning.allocation")
    size.add_argument("--al-samples", type=int, help="guided samples per target and round (active_learning.samples)")
    size.add_argument("--ensemble", type=int, help="MLFF committee size")
    p.add_argument("--workers", type=int, help="RSS worker processes (rss.workers)")
    p.add_argument("--rss-arm-seed", type=int, default=7919, help="evaluate.seed of every seed's study: one "
                   "shared RSS arm per target")
    p.add_argument("--rss-arm-ahead", action="store_true",
                   help="run the shared RSS arms in one background process during training and sampling")
    p.add_argument("--allow-eager", action="store_true",
                   help="run even where the compiled PaiNN operator is not available (several times slower: "
                        "wall times would not compare with the recorded ones)")
    p.add_argument("--out", help="default benchmarks/discovery/sweep-<config name>-<energy model>")
    p.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from runs.jsonl, run nothing")
    p.add_argument("--save-arms", action="store_true",
                   help="write the shared RSS arms the store holds now to <out>/rss-arms/ and stop (safe beside a "
                        "running invocation; every invocation also writes them when it ends)")
    p.add_argument("--rss-arms-only", action="store_true",
                   help="relax every target's shared RSS arm (the baseline stage, --rss-budget each) and stop: they "
                        "depend on no seed or model, so they can run ahead on an idle core; no seed-run is recorded")
    args = p.parse_args(argv)
    if args.rss_arms_only or args.save_arms:
        if not args.config:
            p.error("--rss-arms-only and --save-arms need --config")
    elif not args.report_only:
        missing = [o for o, v in (("--config", args.config), ("--seeds", args.seeds),
                                  ("--seed-role", args.seed_role)) if not v]
        if missing:
            p.error(f"{', '.join(missing)} required (benchmark hygiene: name every seed's role)")
    elif not (args.out or args.config):
        p.error("--report-only needs --out or --config")
    return args


def base_config(args: argparse.Namespace) -> tuple[str, str, dict]:
    """(benchmark name, energy model, config dict) of the study config with the energy model applied."""
    cfg = load_config(args.config).model_dump(mode="json")
    em = args.energy_model or cfg["oracle"]["name"]
    if em not in ENERGY_MODELS:
        raise ConfigError(f"{args.config}: oracle {em!r} cannot run here: give --energy-model")
    if em != cfg["oracle"]["name"]:  # another model's settings would not fit it
        cfg["oracle"] = {"name": em, "settings": {}}
    if em != cfg["relax"]["method"]:
        cfg["relax"] = {**cfg["relax"], "method": em, "settings": {}}
    return Path(args.config).stem.removeprefix("sweep-"), em, cfg


def study_config(args: argparse.Namespace, base: tuple[str, str, dict], seed: int, store: Path | str) -> dict:
    """The seed's study: the config's sections with the seed and the size options applied."""
    name, em, cfg = base
    d = copy.deepcopy(cfg)
    tag = f"-r{args.rerun}" if args.rerun else ""

    def put(section: str, **values) -> None:
        d[section].update({k: v for k, v in values.items() if v is not None})

    d["name"] = f"sweep-{name}-{em}-s{seed}{tag}"
    put("rss", n=args.rss_train, seed=seed, workers=args.workers)
    put("train", epochs=args.epochs, ensemble=args.ensemble, seed=seed)
    put("sample", n=args.samples, steps=args.steps, seed=seed)
    put("active_learning", rounds=args.al_rounds, relax_per_round=args.al_labels,
        max_relaxations=args.al_budget, allocation=args.allocation, samples=args.al_samples)
    # One RSS arm per target for every seed: same seed, same baseline study (surfdiff_core.stages.baseline)
    put("evaluate", budget=args.budget, rss_budget=args.rss_budget, seed=args.rss_arm_seed,
        rss_study=f"sweep-{name}-{em}-rss")
    d["store"] = {**d["store"], "backend": "sqlite", "path": str(store)}
    return d


def settings_id(args: argparse.Namespace, base: tuple[str, str, dict]) -> str:
    """What is measured, apart from the seed: equal ids are reruns of one protocol."""
    d = study_config(argparse.Namespace(**{**vars(args), "rerun": ""}), base, 0, "")
    d.pop("store")
    d["rss"].pop("workers")
    return settings_hash(d)


# The options that change the config's own settings; without them a run measures what the config ships.
CONFIG_OVERRIDES = ("rss_train", "epochs", "samples", "steps", "budget", "al_rounds", "al_labels", "al_budget",
                    "allocation", "al_samples", "ensemble")


def shipped_settings_id(args: argparse.Namespace, base: tuple[str, str, dict]) -> str:
    """The settings of the config as shipped (this invocation's RSS-arm size and seed): the REPORT's headline,
    whatever other settings ran into the folder last."""
    return settings_id(argparse.Namespace(**{**vars(args), **dict.fromkeys(CONFIG_OVERRIDES)}), base)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        # read-only (git status may rewrite the index): exit 1 = tracked changes; the benchmarks' own outputs
        # (runs.jsonl, REPORT.md of sweep-*/ folders, which a running benchmark writes) are not changes to the code
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/discovery/sweep-*"],
                               cwd=ROOT, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc (macOS): the platform's word for it
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
            "torch": torch.__version__, "painn_kernels": message_op_unavailable_reason() or "compiled"}


def recorded_run(runs: Path, record: dict, run: Callable[[], dict], report: Callable[[], object]) -> None:
    """One seed-run: `run()`'s results into `record`, which is appended to `runs` however the run ends (a failed
    or interrupted run is history too), then a partial report that never hides the run's own error."""
    t0 = time.perf_counter()
    try:
        record.update(run(), status="finished")
    except BaseException as exc:
        record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt | SystemExit) else "failed",
                      error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        record.update(ended=dt.datetime.now().astimezone().isoformat(),
                      wall_total_s=round(time.perf_counter() - t0, 2))
        append_record(runs, record)
        try:
            report()
        except Exception as err:  # noqa: BLE001
            print(f"warning: report not written: {type(err).__name__}: {err}", file=sys.stderr)


def append_record(path: Path, record: dict) -> None:
    """One complete line in one write, flushed to disk: earlier lines are never touched, and a kill leaves
    either the whole record or none of it."""
    line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(f"{path}: short write of a run record")
        os.fsync(fd)
    finally:
        os.close(fd)


def _rss_arm_worker(cfg_data: dict, parent: int) -> None:
    """Every target's shared RSS arm (the baseline stage), one relaxation at a time, into the benchmark's store."""
    import ctypes

    from surfdiff_core.stages import baseline

    with contextlib.suppress(OSError, AttributeError):  # Linux: end with the benchmark, even a killed one
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that was set
        return
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_data)
    cfg = cfg.model_copy(update={"rss": cfg.rss.model_copy(update={"workers": 1})})
    with open_study_store(cfg) as store:
        baseline.run(cfg, store, sample_targets(cfg), progress=False)


def start_rss_arm_ahead(cfg_data: dict):
    """The RSS arms are the bulk of the compute and depend on no model: run them while training and sampling
    leave cores idle (as run.py's --rss-arm-ahead). The evaluation skips the finished ones."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_rss_arm_worker, args=(cfg_data, os.getpid()), daemon=True)
    proc.start()
    return proc


def stop_rss_arm_ahead(proc) -> None:
    if proc is not None:
        if proc.is_alive():
            proc.terminate()  # loses at most the relaxation in flight; the evaluation redoes it
        proc.join()


def hold_lock(out: Path):
    """One invocation at a time into a folder: two would train the same models into the same checkpoints. The
    lock goes with the process (the RSS-arm process does not inherit it)."""
    import fcntl

    fh = (out / "run.lock").open("a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: another sweep.py is running into {out}: wait for it, or give another --out")
    return fh


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # SIGTERM (Slurm's time limit, kill): stop the RSS arms, record the run


def target_rows(ev) -> list[dict]:
    """What the report needs of each target, in every cost unit."""
    from surfdiff_core.evaluate.cost import HEADLINE

    out = []
    for t, row in zip(ev.targets, ev.rows(), strict=True):
        cost = t.cost or {}
        ratio = cost.get("ratio") or {}
        out.append({
            "target": t.key, "cell": t.cell, "composition": t.composition,
            "best_generative_eV": row["best_generative_eV"], "best_rss_eV": row["best_rss_eV"],
            "ratio_relaxations": row["speedup"], "ratio_atom_weighted": ratio.get(HEADLINE), "ratio": ratio,
            "one_target_all_in": t.one_target_all_in,
            # as the all-in counts it: the target's own calls reached RSS's best
            "reached": cost.get("evaluation_until_hit") is not None and cost.get("rss_expected") is not None,
            "rss_expected_relaxations": row["rss_expected_to_reach"], "rss_expected_cost": cost.get("rss_expected"),
            "until_hit_cost": cost.get("until_hit"), "generative_to_reach": row["generative_to_reach_rss_best"],
            "generative_relaxations": row["generative_relaxations"], "rss_relaxations": row["rss_relaxations"],
            "generative_lost": t.generative_lost, "rss_lost": len(t.rss_lost_ids),
            "active_learning_labels": t.active_learning_labels,
            "active_learning_single_points": t.active_learning_single_points,
            "mlff_rank_correlation": row["mlff_rank_correlation"],
            "steps_median": [row["steps_generative_median"], row["steps_rss_median"]],
        })
    return out


def run_seed(args: argparse.Namespace, cfg_data: dict, seed: int) -> dict:
    """One seed from RSS training data to the evaluation (each stage resumes); the record's measured part."""
    cfg = config_from_dict(cfg_data)
    progress = sys.stderr.isatty()
    wall: dict[str, float] = {}
    ahead = None
    who = f"[seed {seed}{f' rerun {args.rerun}' if args.rerun else ''}]"

    def stage(name: str, t0: float, what: str) -> None:
        wall[name] = round(time.perf_counter() - t0, 2)
        print(f"{who} {name}: {what} ({wall[name]:.0f} s)", flush=True)

    with open_study_store(cfg) as store:
        try:
            t0 = time.perf_counter()
            r = rss.run(cfg, store, progress=progress)
            stage("rss_train", t0, f"{r.done} new, {r.skipped} reused of {r.planned} structures")
            if args.rss_arm_ahead:
                ahead = start_rss_arm_ahead(cfg_data)
            t0 = time.perf_counter()
            model = train.run(cfg, store, r, progress=progress)
            stage("train", t0, f"model {model.model_id} on {model.n_train} structures")
            t0 = time.perf_counter()
            al = active.run(cfg, store, model, progress=progress)
            model = al.model
            stage("active_learning", t0, f"{len(al.rounds)} rounds, {al.relaxations} labels, "
                  f"{al.single_points} single points")
            t0 = time.perf_counter()
            samples = sample.run(cfg, store, model, progress=progress)
            stage("sample", t0, f"{len(samples.doc_ids)} samples of {len(samples.targets)} targets")
        finally:
            stop_rss_arm_ahead(ahead)
        t0 = time.perf_counter()
        ev = evaluate.run(cfg, store, samples, progress=progress)
        rows = target_rows(ev)
        stage("evaluate", t0, f"{sum(r['reached'] for r in rows)} of {len(rows)} targets reached")
    from surfdiff_core.stages.evaluate_report import all_in_summary

    print(f"{who} {all_in_summary(ev.all_in)}", flush=True)
    return {"study": cfg.name, "model_id": model.model_id, "targets": rows, "all_in": ev.all_in,
            "training_cost": ev.training_cost, "phase_diagram": ev.phase_diagram,
            "phase_comparison": ev.phase_comparison,
            "active_learning": {"rounds": len(al.rounds), "relaxations": al.relaxations,
                                "single_points": al.single_points}, "wall_s": wall}


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        base = base_config(args) if args.config else None
    except SurfdiffError as err:  # a bad config: one line, nothing written
        sys.exit(f"error: {err}")
    out = Path(args.out or HERE / f"sweep-{base[0]}-{base[1]}")
    runs = out / "runs.jsonl"
    if args.report_only:
        if not runs.is_file():
            sys.exit(f"error: no runs to report in {out}: run the benchmark first")
        report = write_report(out, shipped_settings_id(args, base))
        print(f"report: {report}")
        return report
    store_path = out / "stores" / "all"
    try:  # every target expanded and checked before any work
        first = config_from_dict(study_config(args, base, (args.seeds or [0])[0], store_path))
        targets = sample_targets(first)
    except SurfdiffError as err:
        sys.exit(f"error: {err}")
    names = (f"{t.composition} {cell_label(t.cell, first.substrate.facet)}" for t in targets)
    print(f"{len(targets)} targets: {', '.join(names)}", flush=True)
    if args.save_arms:  # beside a running invocation: no lock (SQLite readers see the last committed state)
        if not store_path.is_dir():
            sys.exit(f"error: no store in {out}: no RSS arms to keep")
        return keep_arms(args, base, out, store_path)
    if (why := message_op_unavailable_reason()) and not args.allow_eager:  # e.g. a worktree without the build
        sys.exit(f"error: the compiled PaiNN operator is not available here ({why}): build it "
                 f"(scripts/setup.sh; a git worktree needs surfdiff_core/ml/_painn_ops*.so) or pass --allow-eager")
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(out)
    try:
        if args.rss_arms_only:
            return run_rss_arms(args, base, argv, out, store_path)
        return run_locked(args, base, argv, out, store_path)
    finally:
        lock.close()  # released now, not when the frame is collected (main() twice in one process)


def log_command(out: Path, argv: list[str]) -> None:
    with (out / "commands.txt").open("a") as fh:
        fh.write(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} .venv/bin/python "
                 f"{' '.join([str(Path(__file__).relative_to(ROOT)), *argv])}  # {time.strftime('%Y-%m-%d %H:%M')}\n")


def arm_study(base: tuple[str, str, dict]) -> str:
    return f"sweep-{base[0]}-{base[1]}-rss"  # as study_config names evaluate.rss_study


def _arms_store(args: argparse.Namespace, base: tuple[str, str, dict], store_path: Path):
    return open_study_store(config_from_dict(study_config(args, base, (args.seeds or [0])[0], store_path)))


@contextlib.contextmanager
def kept_arms(args: argparse.Namespace, base: tuple[str, str, dict], out: Path, store_path: Path):
    """The arms committed beside the history go into the store first; what the store holds of them is written
    back however the invocation ends (a kill at a session's end keeps the arms relaxed so far)."""
    path = arms_file(out, arm_study(base))
    with _arms_store(args, base, store_path) as store:
        try:
            new = load_arms(store, path, arm_study(base))
        except SurfdiffError as err:  # not this benchmark's arms: one line, nothing run
            sys.exit(f"error: {err}")
        if new:
            print(f"{new} RSS-arm relaxations from {path.relative_to(out)}", flush=True)
    try:
        yield
    finally:
        keep_arms(args, base, out, store_path)


def keep_arms(args: argparse.Namespace, base: tuple[str, str, dict], out: Path, store_path: Path) -> Path:
    path = arms_file(out, arm_study(base))
    with _arms_store(args, base, store_path) as store:
        n = save_arms(store, arm_study(base), path)
    print(f"{n} RSS-arm relaxations kept in {path}", flush=True)
    return path


def run_rss_arms(args: argparse.Namespace, base: tuple[str, str, dict], argv: list[str], out: Path,
                 store_path: Path) -> Path:
    """The shared RSS arm of every target, as the evaluation would make it (same study, seed and ids: it skips
    them later), in the foreground with progress. A kill loses at most the relaxations in flight."""
    from surfdiff_core.stages import baseline

    signal.signal(signal.SIGTERM, _terminated)
    log_command(out, argv)
    cfg = config_from_dict(study_config(args, base, (args.seeds or [0])[0], store_path))
    with kept_arms(args, base, out, store_path), open_study_store(cfg) as store:
        result = baseline.run(cfg, store, sample_targets(cfg), progress=True)
        for row in baseline.arm_summary(store, result):
            print(json.dumps(row, default=str), flush=True)
    return out


def run_locked(args: argparse.Namespace, base: tuple[str, str, dict], argv: list[str], out: Path,
               store_path: Path) -> Path:
    """Every seed of this invocation, each appended to runs.jsonl, then the report (the folder's lock held)."""
    signal.signal(signal.SIGTERM, _terminated)
    log_command(out, argv)
    common = {"argv": [sys.executable, __file__, *argv], "args": vars(args), "git": git_commit(), "host": host(),
              "settings_id": settings_id(args, base), "benchmark": base[0], "energy_model": base[1]}
    with kept_arms(args, base, out, store_path):
        run_seeds(args, base, out, store_path, common)
    report = write_report(out, shipped_settings_id(args, base))
    print(f"report: {report}")
    return report


def run_seeds(args: argparse.Namespace, base: tuple[str, str, dict], out: Path, store_path: Path,
              common: dict) -> None:
    runs = out / "runs.jsonl"
    report = functools.partial(write_report, out, shipped_settings_id(args, base))
    for seed in args.seeds:
        cfg_data = study_config(args, base, seed, store_path)
        record = {"run_id": uuid.uuid4().hex[:12], "started": dt.datetime.now().astimezone().isoformat(),
                  "seed": seed, "seed_role": args.seed_role, "rerun": args.rerun, **common,
                  "study_config": cfg_data}
        recorded_run(runs, record, functools.partial(run_seed, args, cfg_data, seed), report)


if __name__ == "__main__":
    main()
