"""Ablations of the discovery benchmark (run.py --extras), not part of the product's evaluation: what force-field
guidance does to unrelaxed samples, and sample quality against the number of diffusion steps (the paper's
Fig. 4b). Both sample afresh (deterministically: a rerun finds its documents), on the first target.

Moved here from the evaluation stage, where `evaluate.guidance_samples` and `evaluate.steps_sweep` switched them
on; a config still naming those keys is refused with a line pointing here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.stages import sample
from surfdiff_core.stages.results import TrainResult
from surfdiff_core.store import ResultsStore, StructureDoc

# the fewest samples per step count when the guidance ablation asks for fewer (or none)
MIN_STEPS_SAMPLES = 8


def oracle_single_points(docs: list[StructureDoc], calculator) -> list[float]:
    out = []
    for d in docs:
        atoms = d.to_atoms()
        atoms.calc = calculator
        out.append(float(atoms.get_potential_energy()))
    return out


def _fresh_samples(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, target: SampleTarget,
                   **update) -> list[StructureDoc]:
    scfg = cfg.sample.model_copy(update={"relax": False, **update})
    res = sample.run(cfg, store, model, targets=[target], scfg=scfg, progress=False)
    return [d for d in store.find({"doc_id": {"$in": res.doc_ids}}) if d.valid]


def guidance_effect(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, target: SampleTarget,
                    calculator, n: int) -> dict[str, float | None]:
    """Median oracle energy of unrelaxed samples (no MLFF relaxation) with and without guidance, same seeds."""
    out: dict[str, float | None] = {}
    for guided in (True, False):
        docs = _fresh_samples(cfg, store, model, target, guidance=guided, n=n, seed=cfg.sample.seed + 1)
        energies = oracle_single_points(docs, calculator)
        out["guided" if guided else "unguided"] = float(np.median(energies)) if energies else None
    if out["guided"] is not None and out["unguided"] is not None:
        out["lowered_by_eV"] = out["unguided"] - out["guided"]
    return out


def steps_quality(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, target: SampleTarget, calculator,
                  steps_list: list[int], n: int) -> dict[str, dict[int, list[float]]]:
    """Oracle energies against diffusion steps, before (single point) and after an oracle relaxation."""
    from surfdiff_core.relax.ase_relax import relax_atoms

    before: dict[int, list[float]] = {}
    after: dict[int, list[float]] = {}
    for steps in steps_list:
        docs = _fresh_samples(cfg, store, model, target, steps=steps, n=n, seed=cfg.sample.seed + 2)
        before[steps] = oracle_single_points(docs, calculator)
        after[steps] = [float(relax_atoms(d.to_atoms(), calculator, fmax=cfg.rss.fmax, steps=cfg.rss.steps,
                                          optimizer=cfg.rss.optimizer, fixed=d.fixed).energy) for d in docs]
    return {"before": before, "after": after}


def run(cfg: SurfdiffConfig, store: ResultsStore, model: TrainResult, target: SampleTarget, *, guidance_n: int,
        steps: list[int]) -> dict[str, Any]:
    """{"guidance": ..., "steps_quality": ...}, each only when asked for (guidance_n > 0, steps not empty)."""
    from surfdiff_core.oracles import get_calculator

    if not (guidance_n or steps):
        return {}
    calculator = get_calculator(cfg.oracle.name, **cfg.oracle.settings)
    out: dict[str, Any] = {}
    if guidance_n:
        out["guidance"] = guidance_effect(cfg, store, model, target, calculator, guidance_n)
    if steps:
        out["steps_quality"] = steps_quality(cfg, store, model, target, calculator, sorted(steps),
                                             max(guidance_n, MIN_STEPS_SAMPLES))
    return out


def report_lines(rows: list[dict], out: Path, figs: Path) -> list[str]:
    """The report's section on the ablation rows (those with "guidance" or "steps_quality"), a figure per seed."""
    from surfdiff_core.evaluate.plots import energy_vs_diffusion_steps

    extras = [r for r in rows if "guidance" in r or "steps_quality" in r]
    if not extras:
        return []
    lines = ["\n## Guidance and diffusion steps\n"]
    for r in extras:
        if r.get("guidance"):
            g = {k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r["guidance"].items()}
            lines.append(f"- seed {r['seed']} ({r['window']}): median oracle energy of unrelaxed samples "
                         f"(no MLFF relaxation), guided {g.get('guided')} eV against unguided {g.get('unguided')} eV: "
                         f"guidance lowers it by {g.get('lowered_by_eV')} eV")
        sq = r.get("steps_quality")
        if sq:
            # JSON turns the step counts into strings: back to ints for the axis
            p = energy_vs_diffusion_steps({int(k): v for k, v in sq["before"].items()},
                                          {int(k): v for k, v in sq["after"].items()},
                                          figs / f"steps-s{r['seed']}.png", title="energy against diffusion steps")
            lines.append(f"\n![steps]({p.relative_to(out)})\n")
    return lines
