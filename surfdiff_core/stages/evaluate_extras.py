"""Optional parts of the evaluation: what force-field guidance does to unrelaxed samples, and sample quality
against the number of diffusion steps (the paper's Fig. 4b). Both sample afresh, so they are opt-in
(`evaluate.guidance_samples`, `evaluate.steps_sweep`)."""

from __future__ import annotations

import numpy as np

from surfdiff_core.config import SampleTarget, SurfdiffConfig
from surfdiff_core.stages import sample
from surfdiff_core.stages.results import TrainResult
from surfdiff_core.store import ResultsStore, StructureDoc


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
