"""Discovery benchmark: surfdiff against random structure search, at equal oracle budget in the target cell.

One command regenerates the report (markdown + PNGs) for one energy model:

    .venv/bin/python benchmarks/discovery/run.py --energy-model emt --seeds 101 202 303

Per seed: RSS training data on c(2x8) Ag4O2..Ag6O5, models trained on D (2 eV window) and D_lowE (0.5 eV),
guided samples of every target, then the evaluation stage: the best distinct samples in MLFF rank order and
`--rss-budget` RSS structures in the same cell, both relaxed with the same oracle and relaxer. Also (--extras,
the last arm, ablations.py): guided against unguided unrelaxed energies, and quality against the number of
diffusion steps.

Seeds 101, 202 and 303 are development seeds: the arms and settings shipped for EMT (committee, active learning,
guidance strength, the wall) were chosen on their results (benchmarks/README.md). The shipped defaults were
measured again on report seeds never used to choose anything by structure_aware.py (seeds 21-23, arm `em`) and
the sweep benchmark (sweep.py, seeds 411-415); numbers of this script are per-target, the training data beside
the ratio, not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import ablations  # noqa: E402
import torch  # noqa: E402

from surfdiff_core.config import config_from_dict, load_config  # noqa: E402
from surfdiff_core.errors import ConfigError, SurfdiffError  # noqa: E402
from surfdiff_core.stages import active, evaluate, rss, sample, train  # noqa: E402
from surfdiff_core.stages.common import open_study_store  # noqa: E402

COMPOSITIONS = ["Ag4O2", "Ag4O3", "Ag4O4", "Ag5O2", "Ag5O3", "Ag5O4", "Ag5O5", "Ag6O2", "Ag6O3", "Ag6O4", "Ag6O5"]
# D+AL: the D model after active-learning rounds; D+CFG: D with an energy-conditioned denoiser, sampled at
# E_diff = 0 with classifier-free guidance; D+CFG+AL: both; D+ODE: the D model sampled with the
# probability-flow ODE (Heun); D+DDIM: the D model sampled with deterministic DDIM steps; D+ENS: the D model with an
# MLFF committee (train.ensemble) relaxing and ranking its samples; D+FM: a flow-matching model on D; D+SP:
# active learning with oracle single points only (MLFF labels at one force call each); arms joined by + combine
# (D+ENS+DDIM, D+ENS+AL, D+ENS+SP, D+ENS+AL+SP); D+ENS+G0 / D+ENS+G3x: the committee arm sampled without
# force-field guidance / with three times its strength (the same trained models)
WINDOWS = {"D": 2.0, "D_lowE": 0.5, "D+AL": 2.0, "D+CFG": 2.0, "D+CFG+AL": 2.0, "D+ODE": 2.0, "D+DDIM": 2.0,
           "D+ENS": 2.0, "D+FM": 2.0, "D+ENS+DDIM": 2.0, "D+ENS+AL": 2.0, "D+SP": 2.0, "D+ENS+SP": 2.0,
           "D+ENS+AL+SP": 2.0, "D+ENS+G0": 2.0, "D+ENS+G3x": 2.0}
FEW_STEP_SAMPLERS = {"+ODE": "ode", "+DDIM": "ddim", "+FM": "flow"}
MODELS = {"demo": {"n_features": 32, "n_rbf": 20, "n_interactions": 3, "cutoff": 5.0},
          "paper": {"n_features": 64, "n_rbf": 30, "n_interactions": 4, "cutoff": 6.0}}
# Force-field guidance strength η·Δt (Å per eV/Å) of an arm: +G0 = no guidance, +G3x = three times the default.
GUIDANCE = {"+G0": 0.0, "+G3x": 0.003}
DEFAULT_ETA_DT = 0.001


def eta_dt_of(window: str) -> float:
    return next((eta for suffix, eta in GUIDANCE.items() if window.endswith(suffix)), DEFAULT_ETA_DT)


def sampler_of(window: str, args) -> tuple[str, int]:
    """(sampler, steps) of an arm: EM with --steps, or a few-step sampler with its own step count."""
    for suffix, name in FEW_STEP_SAMPLERS.items():
        if window.endswith(suffix):
            return name, {"ode": args.ode_steps, "ddim": args.ddim_steps, "flow": args.fm_steps}[name]
    return "em", args.steps


def system_of(args) -> dict:
    """The surface system under test: the paper's Ag-O on Ag(111), or the one of a study config (`--config`):
    its substrate, confinement box, RSS cell and compositions, and (unless --targets) its sample targets."""
    if args.config:
        cfg = load_config(args.config)
        system = {"name": f"{cfg.name}-", "substrate": cfg.substrate.model_dump(),
                  "confinement": cfg.confinement.model_dump(), "cell": cfg.rss.cell,
                  "compositions": list(cfg.rss.compositions),
                  "targets": [{"cell": t.cell, "composition": t.composition} for t in cfg.sample.targets]}
    else:
        system = {"name": "", "substrate": {"element": "Ag", "facet": "fcc111", "lattice_constant": "auto",
                                            "layers": 3, "fixed_layers": 1, "vacuum": 10.0},
                  "cell": "c(2x8)", "compositions": COMPOSITIONS,
                  "targets": [{"cell": "p(4x4)", "composition": "Ag12O6"}, {"cell": "p(3x3)", "composition": "Ag6O3"}]}
    if args.targets:
        system["targets"] = [{"cell": t.split()[1], "composition": t.split()[0]} for t in args.targets]
    if not system["targets"]:
        raise ConfigError(f"{args.config}: no sample targets; give --targets 'COMPOSITION CELL' ...")
    return system


def study_config(args, seed: int, window: str, store: Path) -> dict:
    system = system_of(args)
    sampler, steps = sampler_of(window, args)
    return {
        "name": f"bench-{system['name']}{args.energy_model}-s{seed}",
        "substrate": system["substrate"],
        **({"confinement": system["confinement"]} if "confinement" in system else {}),
        "oracle": {"name": args.energy_model},
        "rss": {"cell": system["cell"], "compositions": system["compositions"], "n": args.rss_train, "seed": seed,
                "fmax": 0.05, "steps": 300, "workers": args.workers},
        "model": {**MODELS[args.model], "energy_features": 16 if "+CFG" in window else 0,
                  "generative": "flow" if "+FM" in window else "diffusion"},
        "train": {"energy_window": WINDOWS[window], "repeat": 2, "epochs": args.epochs, "batch_size": 8,
                  "lr": 1e-3, "patience": 25, "seed": seed, "ensemble": args.ensemble if "+ENS" in window else 1},
        "sample": {"targets": system["targets"],
                   "n": args.samples, "guidance": eta_dt_of(window) > 0, "eta_dt": eta_dt_of(window),
                   "sampler": sampler, "steps": steps,
                   "relax_steps": args.relax_steps, "batch_size": 32, "seed": seed,
                   **({"energy_target": 0.0, "cfg_scale": args.cfg_scale} if "+CFG" in window else {})},
        "evaluate": {"budget": args.budget, "rss_budget": args.rss_budget, "seed": seed + 7919},
        "store": {"backend": "sqlite", "path": str(store)},
        "active_learning": {"rounds": args.al_rounds if "+AL" in window or "+SP" in window else 0,
                            "relax_per_round": args.al_labels if "+AL" in window else 0,
                            "single_points_per_round": args.sp_labels if "+SP" in window else 0,
                            "epochs": args.al_epochs},
    }


def _rss_arm_worker(cfg_data: dict) -> None:
    """The evaluation's RSS arm (the baseline stage), one relaxation at a time, into the seed's store (see
    --rss-arm-ahead)."""
    from surfdiff_core.stages import baseline

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_data)
    cfg = cfg.model_copy(update={"rss": cfg.rss.model_copy(update={"workers": 1})})
    with open_study_store(cfg) as store:
        baseline.run(cfg, store, cfg.sample.targets, progress=False)


def start_rss_arm_ahead(cfg_data: dict):
    """The RSS arm depends only on the seed, the system and the oracle: run it in one background process while
    training and sampling leave cores idle. Its documents have the ids the evaluation plans, which then skips
    them; it is stopped when the evaluation starts (losing at most the relaxation in flight)."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_rss_arm_worker, args=(cfg_data,), daemon=True)
    proc.start()
    return proc


def stop_rss_arm_ahead(proc) -> None:
    if proc is None:
        return
    if proc.is_alive():
        proc.terminate()
    proc.join()


def run_ablations(args, cfg, store, model, samples, seed: int, window: str) -> dict:
    """The ablations' row of one seed and arm (ablations.py), on the evaluation's first target."""
    from surfdiff_core.config import SampleTarget

    first = samples.targets[0]
    t0 = time.perf_counter()
    out = ablations.run(cfg, store, model, SampleTarget(cell=first.cell, composition=first.composition),
                        guidance_n=args.extras_n, steps=[25, 100, args.steps])
    return {"seed": seed, "window": window, "guidance": out.get("guidance", {}),
            "steps_quality": out.get("steps_quality", {}), "wall_s": {"ablations": time.perf_counter() - t0}}


def run_seed(args, seed: int, out: Path) -> list[dict]:
    rows = []
    store_path = out / "stores" / f"s{seed}"
    base = config_from_dict(study_config(args, seed, "D", store_path))
    ahead = None
    with open_study_store(base) as store:
        t0 = time.perf_counter()
        r = rss.run(base, store, progress=True)
        rss_wall = time.perf_counter() - t0
        print(f"[seed {seed}] RSS: {r.done} new, {r.skipped} reused ({rss_wall:.0f} s)", flush=True)
        if args.rss_arm_ahead:
            ahead = start_rss_arm_ahead(study_config(args, seed, args.windows[0], store_path))
        for window in args.windows:
            cfg = config_from_dict(study_config(args, seed, window, store_path))
            t0 = time.perf_counter()
            model = train.run(cfg, store, r, progress=True)
            if cfg.active_learning.rounds:  # labels in the target cells: the evaluation charges them in the budget
                model = active.run(cfg, store, model, progress=True).model
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            samples = sample.run(cfg, store, model, progress=True)
            t_sample = time.perf_counter() - t0
            stop_rss_arm_ahead(ahead)
            ahead = None
            t0 = time.perf_counter()
            ev = evaluate.run(cfg, store, samples, progress=True)
            t_eval = time.perf_counter() - t0
            if args.extras and window == args.windows[-1]:
                rows.append(run_ablations(args, cfg, store, model, samples, seed, window))
            for t, row in zip(ev.targets, ev.rows(), strict=True):
                rows.append({**row, "seed": seed, "window": window, "model_id": model.model_id,
                             "n_train": model.n_train, "training_cost": ev.training_cost,
                             "generative_energies": t.generative_energies, "rss_energies": t.rss_energies,
                             "wall_s": {"rss": rss_wall, "train": t_train, "sample": t_sample, "evaluate": t_eval}})
                print(f"[seed {seed} {window}] {row}", flush=True)
    return rows


def summarise(rows: list[dict], args, out: Path, wall: float) -> Path:
    from surfdiff_core.evaluate.plots import best_energy_curves, energy_distributions

    evals = [r for r in rows if "target" in r]
    system = system_of(args)
    lines = [f"# Discovery benchmark: surfdiff against RSS ({args.energy_model})\n",
             "Commands (each resumable; rows of earlier invocations into this folder are kept):\n",
             *[f"    {c}" for c in (out / "commands.txt").read_text().splitlines()],
             "",
             f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, torch threads "
             f"{torch.get_num_threads()}); seeds {sorted({r['seed'] for r in rows})}"
             + (f"; wall time of the last invocation {wall / 60:.1f} min" if wall else
                "; per-stage wall times of every seed in results.json") + ".  ",
             f"Training data: RSS on {system['cell']} {', '.join(system['compositions'])}, {args.rss_train} "
             "structures per "
             f"seed; model '{args.model}', {args.epochs} epochs; {args.samples} guided samples of {args.steps} "
             f"steps per target; generative arm: the best {args.budget} distinct samples in MLFF rank order; "
             f"RSS arm: {args.rss_budget} relaxations in the target cell. Both relaxed by the same ASE "
             f"BFGS to 0.05 eV/Å, bottom layer fixed.\n",
             "Arms (the `window` column): D = trained on structures within 2 eV of the lowest of their "
             "composition; D_lowE = within 0.5 eV; D+AL = the D model after "
             f"{args.al_rounds} active-learning rounds of {args.al_labels} oracle labels per target (counted "
             f"in the budget), {args.al_epochs} fine-tuning epochs each; D+CFG = D with an energy-conditioned "
             f"denoiser sampled at E_diff = 0 with classifier-free guidance w = {args.cfg_scale}; D+CFG+AL = "
             "both; D+ODE = the D "
             f"model sampled with the probability-flow ODE in {args.ode_steps} Heun steps (2 model evaluations "
             f"each) instead of Euler–Maruyama; D+DDIM = the D model sampled in {args.ddim_steps} deterministic "
             "DDIM steps (1 model evaluation each); D+ENS = the D model with a committee of "
             f"{args.ensemble} MLFFs (itself and {args.ensemble - 1} MLFF-only models of other seeds) whose mean "
             f"relaxes and ranks the samples; D+FM = a flow-matching model on D, sampled in {args.fm_steps} Euler "
             f"steps; D+SP = {args.al_rounds} active-learning rounds of {args.sp_labels} oracle single points per "
             "target (MLFF data only; charged as the RSS relaxations their force calls would buy); +G0 / +G3x = "
             f"sampled without force-field guidance / with η·Δt = {GUIDANCE['+G3x']} instead of "
             f"{DEFAULT_ETA_DT}.\n",
             "| target | window | seed | best surfdiff (eV) | best RSS (eV) | surfdiff relaxations to reach RSS best "
             "(±0.05 eV) | RSS expected | ratio | median steps surfdiff / RSS | AL labels in the cell | "
             "MLFF/oracle rank corr. | training force calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in evals:
        lines.append(f"| {r['target']} | {r['window']} | {r['seed']} | {r['best_generative_eV']} | {r['best_rss_eV']} "
                     f"| {r['generative_to_reach_rss_best'] or 'not reached'} | {r['rss_expected_to_reach']} | "
                     f"{r['speedup'] or '-'} | {r['steps_generative_median']} / {r['steps_rss_median']} | "
                     f"{r.get('active_learning_labels', 0)}"
                     + (f" + {r['active_learning_single_points']} single points (= {r['single_point_charge']})"
                        if r.get("active_learning_single_points") else "")
                     + f" | {r.get('mlff_rank_correlation', '-')} | "
                     f"{r['training_cost']['force_calls']} |")
    lines.append("\n## Median over seeds\n")
    lines.append("Ratio = RSS relaxations (expected, random order) / surfdiff relaxations (active-learning labels "
                 "in the cell first, then samples in MLFF rank order) to come within 0.05 eV of the best of the RSS "
                 "arm. A seed that did not reach it within its relaxations counts as an upper bound, RSS expected / "
                 "(relaxations + 1), marked ≤. The figures' RSS curve pools the RSS arms of all seeds.\n")
    lines.append("| target | window | median ratio | min | max | reached in |")
    lines.append("|---|---|---|---|---|---|")
    figs = out / "figures"
    pictures = []
    for key in sorted({(r["target"], r["window"]) for r in evals}):
        group = [r for r in evals if (r["target"], r["window"]) == key]
        ratios = [r["speedup"] or (r["rss_expected_to_reach"] or 0) / (r["generative_relaxations"] + 1)
                  for r in group]
        reached = sum(1 for r in group if r["speedup"])
        bound = "" if reached == len(group) else "≤ "
        lines.append(f"| {key[0]} | {key[1]} | {bound}{statistics.median(ratios):.1f} | {min(ratios):.1f} | "
                     f"{max(ratios):.1f} | {reached}/{len(group)} seeds |")
        slug = f"{key[0]}-{key[1]}".replace(" ", "-").replace("(", "").replace(")", "")
        # The RSS arms of all seeds are draws from one distribution: pooled, they estimate its curve best.
        rss_pooled = sum((r["rss_energies"] for r in group), [])
        best_energy_curves(rss_pooled,
                           {f"surfdiff {key[1]} seed {r['seed']}": r["generative_energies"] for r in group},
                           figs / f"{slug}-budget.png",
                           title=f"{key[0]} ({args.energy_model}), best energy against oracle relaxations")
        energy_distributions({"surfdiff (relaxed)": sum((r["generative_energies"] for r in group), []),
                              "RSS": rss_pooled}, figs / f"{slug}-energies.png",
                             title=f"{key[0]} {key[1]} ({args.energy_model})")
        pictures.append(f"\n### {key[0]}, {key[1]}\n\n![{slug} budget](figures/{slug}-budget.png) "
                        f"![{slug} energies](figures/{slug}-energies.png)\n")
    lines.extend(pictures)
    lines.extend(ablations.report_lines(rows, out, figs))
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    os.replace(tmp, out / "results.json")  # whole or not at all, for the next invocation's read
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--energy-model", default="emt", choices=["emt", "chgnet", "sevennet"])
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 202, 303])
    p.add_argument("--rss-train", type=int, default=300)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--model", choices=list(MODELS), default="demo")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--relax-steps", type=int, default=100, help="MLFF relaxation steps after sampling")
    p.add_argument("--budget", type=int, default=24)
    p.add_argument("--rss-budget", type=int, default=256)
    p.add_argument("--config", default=None, help="a study config whose surface system to benchmark (default: "
                   "the paper's Ag-O on Ag(111)); sizes, seeds and the energy model still come from these options")
    p.add_argument("--targets", nargs="+", default=None, help="'COMPOSITION CELL' ... (default: the system's)")
    p.add_argument("--windows", nargs="+", default=list(WINDOWS), choices=list(WINDOWS))
    p.add_argument("--al-rounds", type=int, default=2, help="active-learning rounds of the D+AL arm")
    p.add_argument("--al-labels", type=int, default=4, help="oracle labels per target and round (D+AL)")
    p.add_argument("--al-epochs", type=int, default=10, help="fine-tuning epochs per round (D+AL, D+SP)")
    p.add_argument("--sp-labels", type=int, default=32, help="oracle single points per target and round (D+SP)")
    p.add_argument("--ode-steps", type=int, default=50, help="Heun steps of the D+ODE arm (2 evaluations each)")
    p.add_argument("--ddim-steps", type=int, default=100, help="DDIM steps of the D+DDIM arm (1 evaluation each)")
    p.add_argument("--fm-steps", type=int, default=100, help="Euler steps of the D+FM arm (1 evaluation each)")
    p.add_argument("--ensemble", type=int, default=4, help="MLFF committee size of the D+ENS arm")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (D+CFG)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rss-arm-ahead", action="store_true",
                   help="run the evaluation's RSS arm in one background process during training and sampling")
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                   help="ablations after the last arm's evaluation (ablations.py): guidance effect and energy "
                   "against diffusion steps (first target)")
    p.add_argument("--extras-n", type=int, default=16)
    p.add_argument("--out", default=None, help="default benchmarks/discovery/<energy model>")
    p.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from results.json, run nothing")
    args = p.parse_args()
    try:
        system = system_of(args)
    except SurfdiffError as err:  # a bad --config or --targets: one line, nothing written
        sys.exit(f"error: {err}")
    out = Path(args.out or HERE / f"{system['name']}{args.energy_model}")
    if args.report_only and not (out / "results.json").is_file():
        sys.exit(f"error: no results to report in {out}: run the benchmark first")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = json.loads((out / "results.json").read_text())
        print(f"report: {summarise(rows, args, out, 0.0)}")
        return
    with (out / "commands.txt").open("a") as fh:
        fh.write(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} .venv/bin/python "
                 f"{' '.join(sys.argv)}  # {time.strftime('%Y-%m-%d %H:%M')}\n")
    t0 = time.perf_counter()
    mine = {(s, w) for s in args.seeds for w in args.windows}
    done: list[dict] = []

    def rows() -> list[dict]:
        # Rows of other seeds and windows stay in the report; read again before every write, since another
        # invocation into the same folder may have added rows meanwhile.
        path = out / "results.json"
        old = json.loads(path.read_text()) if path.exists() else []
        return [r for r in old if (r["seed"], r["window"]) not in mine] + done

    for seed in args.seeds:
        done += run_seed(args, seed, out)
        summarise(rows(), args, out, time.perf_counter() - t0)  # a partial report after every seed
    print(f"report: {summarise(rows(), args, out, time.perf_counter() - t0)}")


if __name__ == "__main__":
    main()
