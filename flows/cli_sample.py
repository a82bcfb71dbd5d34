"""`surfdiff sample`: generate structures with a study's trained (or a shipped pretrained) model, and its parser,
whose sampler, guidance, inpainting and seeded-exploration options outnumber every other stage's."""

from __future__ import annotations

import argparse
import json

from flows.cli_common import load_study
from flows.cli_slurm import run_as_slurm_job
from surfdiff_core.errors import ConfigError


def _inpaint_options(args: argparse.Namespace, section) -> dict | None:
    """The sample.inpaint section with --inpaint-from / --fix* / --resample applied (None: none given)."""
    given = {"source": args.inpaint_from, "resample": args.resample,
             "elements": [e.strip() for e in args.fix.split(",") if e.strip()] if args.fix else None,
             "z_range": args.fix_z, "indices": args.fix_indices}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if section.inpaint is None and "source" not in given:
        raise ConfigError("--fix, --fix-z, --fix-indices and --resample need --inpaint-from FILE_OR_DOC_ID "
                          "(or sample.inpaint in the config)")
    from pydantic import ValidationError

    from surfdiff_core.config import InpaintConfig, format_validation_error

    base = section.inpaint.model_dump() if section.inpaint is not None else {}
    try:  # checked here so that a bad value names the option, not the config key
        return InpaintConfig.model_validate({**base, **given}).model_dump()
    except ValidationError as exc:
        names = {"source": "--inpaint-from", "elements": "--fix", "z_range": "--fix-z", "indices": "--fix-indices",
                 "resample": "--resample"}
        key = str(exc.errors()[0]["loc"][0]) if exc.errors() and exc.errors()[0]["loc"] else ""
        raise ConfigError(f"{names.get(key, '--inpaint-from')}: {format_validation_error(exc).split(': ', 1)[-1]}") \
            from None


def cmd_sample(args: argparse.Namespace) -> int:
    from surfdiff_core import pretrained
    from surfdiff_core.config import with_overrides
    from surfdiff_core.query import require_existing_store
    from surfdiff_core.stages import sample
    from surfdiff_core.stages.common import check_store_writable, open_study_store, sample_targets, target_system

    if args.checkpoint:
        raise ConfigError("--checkpoint was replaced by --model-id (see `surfdiff query --config CONFIG --models`)")
    cfg = load_study(args.config, args.store)
    scfg = with_overrides(cfg.sample, {"n": args.n, "steps": args.steps, "guidance": args.guidance,
                                       "sampler": args.sampler, "seed": args.seed, "batch_size": args.batch_size,
                                       "eta_dt": args.eta_dt, "relax": args.relax,
                                       "energy_target": args.energy_target, "cfg_scale": args.cfg_scale,
                                       "corrector_steps": args.corrector_steps, "snr": args.snr,
                                       "inpaint": _inpaint_options(args, cfg.sample),
                                       "seed_structure": args.seed_structure, "t0": args.t0,
                                       "novelty": args.novelty})
    targets = sample_targets(cfg, [args.cell] if args.cell else None,
                             [args.composition] if args.composition else None)
    for t in targets:  # validate every target (cell, composition, box) before any work
        target_system(cfg, t)
    shipped = pretrained.find_shipped(args.model_id)
    if shipped is not None:  # sampled directly: checked before a store is made for it
        pretrained.check_fits(shipped, cfg)
    else:
        require_existing_store(cfg.store)  # its model is registered there: a missing store is not created empty
    check_store_writable(cfg)
    if scfg.inpaint is not None or scfg.seed_structure is not None:  # a bad source is one line before any work
        with open_study_store(cfg) as store:
            sample.check_conditioning(cfg, store, targets, scfg)
    if args.executor == "slurm":  # validated here (a shipped model is registered by the job); one Slurm job
        if shipped is None:  # the store's model: checked before the job waits in the queue
            sample.resolve_model(cfg, model_id=args.model_id)
        return run_as_slurm_job("sample", args)
    model = sample.resolve_model(cfg, model_id=args.model_id)
    with open_study_store(cfg) as store:
        res = sample.run(cfg, store, targets=targets, scfg=scfg, model_id=model.model_id, run_id=args.run_id,
                         device=args.device)
    for s in res.targets:
        best = f"{s.best_energy:.3f} eV" if s.best_energy is not None else "-"
        print(f"{s.composition} {s.cell}: {s.n_valid}/{s.n} valid (rejection rate {s.rejection_rate:.1%}), "
              f"best MLFF energy {best}, {s.structure_steps_per_second:.1f} structure-steps/s")
        if s.reused_batches:  # a resumed run says what it did not generate again, and from which run
            print(f"  {s.reused_batches} of {s.batches} batches already in the store "
                  f"(run {', '.join(s.reused_runs) or '?'})")
    if res.targets and all(s.reused_batches == s.batches for s in res.targets):
        runs = sorted({r for s in res.targets for r in s.reused_runs})
        print(f"model {res.model_id}: nothing new to generate; the documents carry run {', '.join(runs) or '?'}")
    else:
        print(f"model {res.model_id}, run {res.run_id}")
    if args.json:
        print(json.dumps([t for t in res.as_dict(ids=False)["targets"]], indent=1))
    return 0


def add_sample_parser(sub) -> argparse.ArgumentParser:
    """The `sample` subcommand; --store and the executor options are added beside the other stages'."""
    s = sub.add_parser("sample", help="generate structures with the study's trained model into the store")
    s.add_argument("config")
    s.add_argument("--cell", default=None, help="e.g. 'p(4x4)' (default: sample.targets of the config)")
    s.add_argument("--composition", default=None, help="e.g. Ag12O6")
    s.add_argument("--n", type=int, default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--sampler", choices=["em", "ode", "ddim", "flow", "pc", "ffc"], default=None,
                   help="pc: + Langevin corrector; ffc: + MLFF force corrector near t = 0")
    s.add_argument("--corrector-steps", type=int, default=None, help="pc/ffc: corrector steps per step")
    s.add_argument("--snr", type=float, default=None, help="pc: Langevin signal-to-noise ratio (default 0.16)")
    s.add_argument("--inpaint-from", default=None, metavar="FILE_OR_DOC_ID",
                   help="inpainting: keep atoms of this structure (file or document id), generate the rest")
    s.add_argument("--fix", default=None, metavar="ELEMENTS",
                   help="inpainting: keep the source's overlayer atoms of these elements, e.g. 'O' or 'O,Ag'")
    s.add_argument("--fix-z", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="inpainting: keep the source's overlayer atoms between LO and HI Å above the surface")
    s.add_argument("--fix-indices", type=lambda v: [int(i) for i in v.split(",")], default=None, metavar="I,J,..",
                   help="inpainting: keep these overlayer atoms of the source (0-based, after the substrate)")
    s.add_argument("--resample", type=int, default=None, help="inpainting: RePaint repeats per step (default 3)")
    s.add_argument("--from", dest="seed_structure", default=None, metavar="STRUCTURE",
                   help="seeded exploration: start from this structure (file or document id) noised to --t0")
    s.add_argument("--t0", type=float, default=None, help="seeded exploration: noise level to start from (0.3)")
    s.add_argument("--novelty", type=float, default=None,
                   help="novelty guidance away from the study's known minima, strength in Å² (0 = off)")
    s.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="force-field guidance (default: sample.guidance)")
    s.add_argument("--relax", action=argparse.BooleanOptionalAction, default=None,
                   help="short MLFF relaxation after sampling")
    s.add_argument("--eta-dt", type=float, default=None, help="guidance strength ηΔt in Å²/eV (paper: 0.001)")
    s.add_argument("--energy-target", type=float, default=None,
                   help="energy-conditioned models: E_diff to sample at, eV per movable atom above the lowest "
                        "training structure (0 = as low as the data goes)")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 2)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--model-id", default=None,
                   help="registered model, or a shipped pretrained model's name (see `surfdiff models`); default: "
                        "the newest for this study, system and energy model")
    s.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # replaced by --model-id
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    s.add_argument("--run-id", default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sample)
    return s
