"""`surfdiff rss | train | sample | relax | evaluate | baseline | run`: the pipeline's stages on the command line,
and their parsers (`sample`, with its many options, in cli_sample.py). Library imports stay inside the commands,
so that the command line starts fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.cli_common import STORE_HELP, check_at_least, load_study
from flows.cli_sample import _inpaint_options as _inpaint_options  # imported from here by the tests
from flows.cli_sample import add_sample_parser
from flows.cli_sample import cmd_sample as cmd_sample
from flows.cli_slurm import add_executor_options, run_as_slurm_job
from surfdiff_core.errors import ConfigError, SurfdiffError


# ---- stages -----------------------------------------------------------------------------------------------
def cmd_rss(args: argparse.Namespace) -> int:
    from deploy.slurm import open_executor
    from surfdiff_core.config import with_overrides
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.stages import rss
    from surfdiff_core.stages.common import check_store_writable, open_study_store
    from surfdiff_core.system_build import resolve_lattice, systems_for

    cfg, spec = load_study(args.config, args.store), ExecutorSpec(args.executor, args.hpc_settings)
    # Every option through the config model (ranges, seeds >= 0, the size bound): one line naming it.
    rcfg = with_overrides(cfg.rss, {"n": args.n, "seed": args.seed, "workers": args.workers})
    if rcfg.n == 0:
        raise ConfigError("nothing to do: 0 structures asked (--n or rss.n); the store is left as it is")
    cfg = cfg.model_copy(update={"rss": rcfg})
    # Validate the whole search (systems, box, lattice, oracle) before the store is opened: nothing half-written.
    systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, resolve_lattice(cfg))
    check_store_writable(cfg)  # a read-only or full disk: one line now, not after the relaxations ran
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        r = rss.run(cfg, store, run_id=args.run_id, executor=ex)
        label = store.label
    gave_up = f", {r.given_up} failed for good (rss.max_attempts)" if r.given_up else ""
    others = f", {r.by_others} computed meanwhile by another process" if r.by_others else ""
    print(f"RSS: {r.done} relaxed, {r.skipped} already in the store{others}, {r.retried} retried, {r.failed} failed"
          f"{gave_up}, {r.out_of_box} left the box; {r.per_minute:.1f} relaxations/min")
    for comp, e in sorted(r.best.items()):
        print(f"  best {comp}: {e:.4f} eV")
    print(f"study {r.study}, energy model {r.energy_model}, run {r.run_id}; store: {label}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from surfdiff_core.config import with_overrides
    from surfdiff_core.query import require_existing_store
    from surfdiff_core.stages import train
    from surfdiff_core.stages.common import check_store_writable, open_study_store

    cfg = load_study(args.config, args.store)
    with_overrides(cfg.train, {"epochs": args.epochs, "device": args.device})  # one line naming a bad option
    require_existing_store(cfg.store)  # training reads the store: a missing one is not created empty
    check_store_writable(cfg)
    if args.executor == "slurm":  # validated here; the same command runs as one Slurm job
        return run_as_slurm_job("train", args)
    with open_study_store(cfg) as store:
        s = train.run(cfg, store, epochs=args.epochs, device=args.device)
    last = s.history[-1] if s.history else {}
    if s.resumed_from:
        print(f"resumed from its checkpoint at epoch {s.resumed_from}")
    print(f"model {s.model_id}: {s.epochs} epochs, best validation loss {s.best_val:.4f} "
          f"(score {last.get('val_score', float('nan')):.4f}, forces {last.get('val_forces', float('nan')):.4f}); "
          f"{s.n_train} train / {s.n_val} validation structures; {s.samples_per_second:.1f} samples/s")
    print(f"trained on study {s.study}, system {s.system_id}, energy model {', '.join(s.energy_models)}")
    if s.committee:
        print(f"MLFF committee (ranks its samples with it): {', '.join(s.committee)}")
    if s.warning:
        print(f"warning: {s.warning}", file=sys.stderr)
    print(f"checkpoint: {s.checkpoint}")
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    from deploy.slurm import open_executor
    from surfdiff_core.config import with_overrides
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.query import require_existing_store
    from surfdiff_core.stages import relax
    from surfdiff_core.stages.common import check_store_writable, open_study_store
    from surfdiff_core.sweep import sweep_compositions
    from surfdiff_core.system_build import check_oracle_support

    cfg, spec = load_study(args.config, args.store), ExecutorSpec(args.executor, args.hpc_settings)
    rcfg = with_overrides(cfg.relax, {"top_k": args.top_k, "method": args.method})
    compositions = [t.composition for t in cfg.sample.targets] + sweep_compositions(cfg.sample.sweep)
    check_oracle_support(cfg, compositions, method=rcfg.method, settings=rcfg.settings)
    require_existing_store(cfg.store)  # the candidates come from the store: a missing one is not created empty
    check_store_writable(cfg)
    with open_executor(spec, "relax") as ex, open_study_store(cfg) as store:
        s = relax.run(cfg, store, rcfg=rcfg, model_id=args.model_id, run_id=args.run_id, executor=ex)
    if not s.candidates:
        raise SurfdiffError(f"nothing to relax: study {cfg.name!r} has no valid generated structures of that model "
                            f"(run `surfdiff sample CONFIG` first)")
    gave_up = f", {s.given_up} failed for good (relax.max_attempts)" if s.given_up else ""
    others = f", {s.by_others} relaxed meanwhile by another process" if s.by_others else ""
    print(f"relax ({s.method}): {s.candidates} candidates, {s.relaxed} relaxed, {s.skipped} reused{others}, "
          f"{s.retried} retried, {s.failed} failed{gave_up}")
    for key, e in sorted(s.best.items()):
        print(f"  best {key}: {e:.4f} eV")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deploy.slurm import open_executor
    from surfdiff_core.config import with_overrides
    from surfdiff_core.evaluate.budget import energy_phrase, speedup_phrase
    from surfdiff_core.evaluate.cost import cost_phrase
    from surfdiff_core.evaluate.phase import window_text
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.query import require_existing_store
    from surfdiff_core.stages import evaluate
    from surfdiff_core.stages.common import (
        check_store_writable,
        figure_dir,
        open_study_store,
        sample_targets,
        target_system,
    )
    from surfdiff_core.stages.evaluate_report import all_in_summary, markdown_report

    cfg, spec = load_study(args.config, args.store), ExecutorSpec(args.executor, args.hpc_settings)
    ecfg = with_overrides(cfg.evaluate, {"budget": args.budget, "rss_budget": args.rss_budget})
    if args.reference:
        key, _, path = args.reference.partition("=")
        if not path or not Path(path).is_file():
            raise ConfigError(f"--reference {args.reference!r}: give 'COMPOSITION CELL=FILE' with an existing file")
        ecfg = ecfg.model_copy(update={"references": {**ecfg.references, key.strip(): path}})
    cfg = cfg.model_copy(update={"evaluate": ecfg})
    targets = sample_targets(cfg, [args.cell] if args.cell else None, [args.composition] if args.composition else None)
    for t in targets:
        target_system(cfg, t)
    require_existing_store(cfg.store)  # it evaluates a trained model's samples: a missing store is not made
    check_store_writable(cfg)
    # the evaluation's relaxations are RSS-like (in-process oracle, rss settings): "rss" jobs on Slurm
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        result = evaluate.run(cfg, store, model_id=args.model_id, targets=targets, sample_run=args.sample_run,
                              executor=ex)
    report = figure_dir(cfg) / "evaluation" / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown_report(result))
    cost = result.training_cost
    print(f"evaluation of {result.study} (model {result.model_id}, {result.energy_model}); training data: "
          f"{cost['structures']} structures, {cost['force_calls']} oracle force calls"
          + (f"; fine-tuned from the shipped model {cost['pretrained']['name']}, whose training data "
             f"({cost['pretrained']['force_calls']:.0f} force calls) the all-in ratios charge"
             if cost.get("pretrained") else ""))
    for r in result.rows():
        sp = speedup_phrase(r["speedup"])
        print(f"  {r['target']}: {r['valid']} valid, unique {r['unique']}, best surfdiff "
              f"{energy_phrase(r['best_generative_eV'])} ({r['generative_relaxations']} relaxed) vs RSS "
              f"{energy_phrase(r['best_rss_eV'])} ({r['rss_relaxations']}): {sp}; "
              f"median steps {r['steps_generative_median']} vs {r['steps_rss_median']}"
              + (f"; MLFF/oracle rank correlation {r['mlff_rank_correlation']}"
                 if r["mlff_rank_correlation"] is not None else "")
              + (f"; {r['active_learning_labels']} of the relaxations were active-learning labels"
                 if r["active_learning_labels"] else "")
              + (f"; {r['active_learning_single_points']} active-learning single points, charged as "
                 f"{r['single_point_charge']} relaxations" if r["active_learning_single_points"] else "")
              + (f"; reference found at rank {r['reference_rank']}" if r["reference_rank"] else "")
              + (f"; {cost_phrase(r['speedup_atom_weighted'])}; one-target all-in: "
                 f"{cost_phrase(r['one_target_all_in'])}" if result.all_in else ""))
    if result.all_in:
        print(f"  {all_in_summary(result.all_in)}")
    for warning in result.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    for seg in result.phase_diagram:
        print(f"  Δμ {window_text(seg['dmu_min'], seg['dmu_max'], ' .. ')} eV: {seg['phase']}")
    for arm in result.phase_comparison.get("arms", {}):
        from surfdiff_core.evaluate.phase_compare import missed_sentence

        print(f"  phase diagram: {missed_sentence(result.phase_comparison, arm)}")
    if args.json:
        print(json.dumps(result.as_dict(), indent=1, default=str))
    print(f"report: {report}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from deploy.slurm import open_executor
    from surfdiff_core.config import with_overrides
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.stages import baseline
    from surfdiff_core.stages.common import check_store_writable, open_study_store, sample_targets, target_system

    cfg, spec = load_study(args.config, args.store), ExecutorSpec(args.executor, args.hpc_settings)
    ecfg = with_overrides(cfg.evaluate, {"rss_budget": args.rss_budget})
    if ecfg.rss_budget == 0:
        raise ConfigError("nothing to do: 0 relaxations asked (--rss-budget or evaluate.rss_budget); the store is "
                          "left as it is")
    cfg = cfg.model_copy(update={"evaluate": ecfg})
    targets = sample_targets(cfg, [args.cell] if args.cell else None, [args.composition] if args.composition else None)
    for t in targets:  # every target cell and composition checked before the store is opened
        target_system(cfg, t)
    check_store_writable(cfg)  # the arm needs no model: a new store is created, as by `surfdiff rss`
    with open_executor(spec, "rss") as ex, open_study_store(cfg) as store:
        result = baseline.run(cfg, store, targets, run_id=args.run_id, executor=ex)
        rows = baseline.arm_summary(store, result)
        label = store.label
    print(f"RSS baseline of study {result.rss_study} ({result.energy_model}, {result.rss_budget} relaxations per "
          f"target, seed {result.seed}, arm {result.config_hash}):")
    for r in rows:
        best = "-" if r["best_energy_eV"] is None else f"{r['best_energy_eV']:.4f} eV"
        print(f"  {r['target']}: {r['relaxations']} relaxations ({r['done']} new, {r['skipped']} already in the "
              f"store, {r['failed']} failed), {r['lost']} lost, best {best}")
    for t in result.targets:
        for doc_id, why in sorted(t.lost.items()):
            print(f"warning: {t.key}: job {doc_id} lost on the executor ({why}); rerun to redo it", file=sys.stderr)
    print(f"store: {label}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from surfdiff_core.config import with_overrides
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.stages.common import check_store_writable, data_root, sample_targets, target_system
    from surfdiff_core.stages.evaluate import target_key

    cfg = load_study(args.config, args.store, one_process=True)  # one clear line before Prefect starts
    check_at_least("rss-n", args.rss_n, 0)
    if args.rss_n is not None:
        cfg = cfg.model_copy(update={"rss": with_overrides(cfg.rss, {"n": args.rss_n})})
    targets = [target_key(t, target_system(cfg, t)) for t in sample_targets(cfg)]  # each built and checked
    spec = ExecutorSpec(args.executor, args.hpc_settings)
    if spec.on_slurm:
        from deploy.hpc import load_settings

        load_settings(spec.hpc_settings)  # a bad settings file: one line before Prefect starts
    check_store_writable(cfg)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Bars on a terminal; in a log file (nohup, a batch job) the same bars, one refresh every 30 s, not silence.
    os.environ.setdefault("SURFDIFF_PROGRESS", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("SURFDIFF_PROGRESS_INTERVAL", "30")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # stage lines reach a log file as they are printed
    print(f"study {cfg.name}: {targets_line(targets)}")  # what a sweep expanded to, up front
    # The temporary local API needs no telemetry (and its heartbeat races the run for the SQLite lock).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.discovery import discovery_flow
    from flows.ephemeral import start_ephemeral_server
    from flows.failure_logs import quiet_failure_reports

    quiet_failure_reports()  # a failure is this command's one line, not Prefect's tracebacks as well

    start_ephemeral_server()  # the temporary API server dies with this command, even on SIGKILL
    from surfdiff_core.evaluate.budget import energy_phrase, speedup_phrase
    from surfdiff_core.evaluate.cost import cost_phrase
    from surfdiff_core.evaluate.phase import window_text
    from surfdiff_core.stages.evaluate_report import all_in_summary

    result = discovery_flow(study=cfg, executor=spec.kind, hpc_settings=spec.hpc_settings)  # the flow's strings
    print("\n=== surfdiff discovery finished ===")
    rss, model = result["rss"], result["model"]
    print(f"study {cfg.name}: RSS: {rss['done']} new + {rss['skipped']} reused structures")
    print(f"model: {model['model_id']} ({model['checkpoint']})")
    if model.get("resumed_from"):
        print(f"resumed training at epoch {model['resumed_from']}")
    if model.get("warning"):
        print(f"warning: {model['warning']}", file=sys.stderr)
    for r in result["samples"]["targets"]:
        best = f"{r['best_energy']:.4f} eV" if r["best_energy"] is not None else "-"
        print(f"generated {r['composition']} {r['cell']}: {r['n_valid']}/{r['n']} valid, best MLFF energy {best}")
    for key, e in sorted(result["relax"]["best"].items()):
        print(f"relaxed ({result['relax']['method']}) best {key}: {e:.4f} eV")
    for r in result.get("evaluation") or []:
        sp = speedup_phrase(r["speedup"])
        print(f"evaluated {r['target']}: surfdiff best {energy_phrase(r['best_generative_eV'])}, RSS best "
              f"{energy_phrase(r['best_rss_eV'])} in the same cell: {sp}"
              + (f"; one-target all-in: {cost_phrase(r['one_target_all_in'])}" if "one_target_all_in" in r else ""))
    if result.get("evaluation_all_in"):  # the discovery flow's dict, when it passes the sweep's all-in on
        print(all_in_summary(result["evaluation_all_in"]))
    for seg in result.get("phase_diagram") or []:
        print(f"stable phase for Δμ {window_text(seg['dmu_min'], seg['dmu_max'], ' .. ')} eV: {seg['phase']}")
    for warning in result.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    outputs = result.get("outputs") or {}
    print(f"\nresults store: {cfg.store.path} ({cfg.store.backend})")
    if outputs.get("report"):
        print(f"report: {outputs['report']}")
    print(f"figures: {outputs.get('figures') or data_root(cfg) / 'figures'}")
    if outputs.get("best"):
        print(f"best structures (oracle-relaxed, one per target): {outputs['best']}")
    print("query them with, e.g.:")
    print(f"  surfdiff query --config {args.config} --source relaxed --top 5")
    print(f"  surfdiff query --config {args.config} --source generated --top 10 --export best.extxyz")
    return 0


def targets_line(names: list[str], shown: int = 12) -> str:
    """'3 targets: Ag2O1 p(3x3), …', the first `shown` of them named."""
    more = f", … and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} target{'s' if len(names) != 1 else ''}: {', '.join(names[:shown])}{more}"


# ---- parser -----------------------------------------------------------------------------------------------
def add_stage_parsers(sub) -> None:
    r = sub.add_parser("rss", help="random structure search: training data into the store")
    r.add_argument("config", help="YAML config (see configs/)")
    r.add_argument("--n", type=int, default=None, help="number of structures (default: rss.n of the config)")
    r.add_argument("--seed", type=int, default=None, help="run seed (default: rss.seed)")
    r.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: rss.workers)")
    r.add_argument("--run-id", default=None, help="label stored with every document")
    r.set_defaults(func=cmd_rss)

    t = sub.add_parser("train", help="train the denoiser and MLFF on the study's RSS data")
    t.add_argument("config")
    t.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    t.set_defaults(func=cmd_train)

    s = add_sample_parser(sub)

    x = sub.add_parser("relax", help="relax the study's best generated candidates (jobflow/atomate2)")
    x.add_argument("config")
    x.add_argument("--top-k", type=int, default=None)
    x.add_argument("--method", default=None, help="emt | chgnet | sevennet | gpaw | vasp")
    x.add_argument("--model-id", default=None, help="candidates of this model (default: the newest)")
    x.add_argument("--run-id", default=None, help="candidates of this sampling run only")
    x.set_defaults(func=cmd_relax)

    e = sub.add_parser("evaluate", help="discovery power against RSS in each target cell; γ(Δμ) phase diagram")
    e.add_argument("config")
    e.add_argument("--cell", default=None, help="e.g. 'p(4x4)' (default: sample.targets of the config)")
    e.add_argument("--composition", default=None, help="e.g. Ag12O6")
    e.add_argument("--budget", type=int, default=None, help="oracle relaxations of samples per target")
    e.add_argument("--rss-budget", type=int, default=None, help="RSS relaxations in each target cell")
    e.add_argument("--model-id", default=None, help="samples of this model (default: the newest)")
    e.add_argument("--sample-run", default=None, metavar="RUN_ID",
                   help="the model's samples of this sample run (default: those the config's sample section makes)")
    e.add_argument("--reference", default=None, metavar="'COMPOSITION CELL=FILE'",
                   help="a known minimum to look for, e.g. 'Ag12O6 p(4x4)=ag6.extxyz'")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("baseline", help="the evaluation's RSS arm in each target cell (no model needed); resumable")
    b.add_argument("config")
    b.add_argument("--cell", default=None, help="e.g. 'p(4x4)' (default: sample.targets of the config)")
    b.add_argument("--composition", default=None, help="e.g. Ag12O6")
    b.add_argument("--rss-budget", type=int, default=None, help="RSS relaxations in each target cell "
                   "(default: evaluate.rss_budget)")
    b.add_argument("--run-id", default=None, help="the result's run id (the documents carry none: a shared arm)")
    b.set_defaults(func=cmd_baseline)

    u = sub.add_parser("run", help="the whole discovery pipeline (Prefect flow, embedded store, no server)")
    u.add_argument("config")
    u.add_argument("--rss-n", type=int, default=None, help="override rss.n")
    u.set_defaults(func=cmd_run)
    for p in (r, t, s, x, e, b, u):
        p.add_argument("--store", default=None, metavar="PATH", help=STORE_HELP)
    for p in (r, x, e, b, u):  # the stages that fan out: RSS and relaxations (the evaluation's: both arms)
        add_executor_options(p, "one Slurm job per structure or batch")
    for p in (t, s):  # one job each, on the settings' GPU
        add_executor_options(p, "the command as one Slurm job on a GPU (gres)", wait=True)
