"""Guided generation into any cell and composition, and its documents in the store.

A trained checkpoint (denoiser + MLFF) samples `n` structures of a SurfaceSystem in batches on the
accelerator: uniform prior over the confinement box, reverse SDE (or probability-flow ODE) with force-field
guidance, a short batched MLFF relaxation, then validity checks (distances < 1 Å or atoms outside the box
are rejected and counted). Every sample becomes a `generated` document with full provenance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from surfdiff_core.config import SampleConfig
from surfdiff_core.diffusion.guidance import ForceFieldGuidance
from surfdiff_core.diffusion.samplers import SAMPLERS
from surfdiff_core.diffusion.validity import check_validity
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.relax.mlff import mlff_relax
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import atoms_to_structure_dict
from surfdiff_core.system import SurfaceSystem
from surfdiff_core.train.trainer import LoadedModel


@dataclass
class GenerationResult:
    system: SurfaceSystem
    positions: list[np.ndarray] = field(default_factory=list)  # full slab positions per sample
    energies: list[float | None] = field(default_factory=list)
    forces: list[np.ndarray] = field(default_factory=list)
    fmax: list[float] = field(default_factory=list)
    relax_steps: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    wall_time: float = 0.0
    structure_steps: int = 0

    @property
    def n(self) -> int:
        return len(self.valid)

    @property
    def rejection_rate(self) -> float:
        return 1.0 - sum(self.valid) / self.n if self.n else 0.0


def _unknown_elements(loaded: LoadedModel, system: SurfaceSystem) -> set[str]:
    from ase.data import atomic_numbers

    known = set(loaded.model.spec.elements)
    symbols = set(system.template.get_chemical_symbols()) | set(system.overlayer)
    return {s for s in symbols if atomic_numbers[s] not in known}


def prior_batch(system: SurfaceSystem, n: int, device, dtype=torch.float32) -> SlabBatch:
    atoms = system.compose(np.tile(np.mean(system.z_box), (len(system.overlayer), 3)))
    return collate([atoms] * n, [system.movable] * n, [system.z_box] * n, device=device, dtype=dtype)


def generate(
    loaded: LoadedModel,
    system: SurfaceSystem,
    scfg: SampleConfig,
    *,
    n: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> GenerationResult:
    missing = _unknown_elements(loaded, system)
    if missing:
        raise SurfdiffError(
            f"the model was not trained on {', '.join(sorted(missing))}: cannot sample {system.composition}"
        )
    n = scfg.n if n is None else n
    seed = scfg.seed if seed is None else seed
    model, process = loaded.model.to(device).eval(), loaded.process
    sampler = SAMPLERS[scfg.sampler]
    guidance = ForceFieldGuidance(eta_dt=scfg.eta_dt) if scfg.guidance and scfg.eta_dt > 0 else None
    gen = torch.Generator(device=device).manual_seed(seed)
    res = GenerationResult(system=system)
    t0 = time.perf_counter()
    n_batches = -(-n // scfg.batch_size)
    bar = tqdm(total=n_batches * scfg.steps, desc=f"sample {system.composition} {system.cell}", unit="step",
               disable=not progress, dynamic_ncols=True)
    for k in range(n_batches):
        size = min(scfg.batch_size, n - k * scfg.batch_size)
        x = process.sample_prior(prior_batch(system, size, device), generator=gen)
        x = sampler(model.denoise, x, process, steps=scfg.steps, guidance=guidance,
                    callback=lambda i, t, b: bar.update(1), generator=gen)
        res.structure_steps += size * scfg.steps
        if scfg.relax and scfg.relax_steps > 0:
            x, info = mlff_relax(model.denoise, x, steps=scfg.relax_steps)
            steps = info.steps.tolist()
        else:
            steps = [0] * size
        out = model(x, None, score=False, energy=True, forces=True)
        valid, reasons = check_validity(x, min_distance=1.0)
        forces = out.forces.detach().cpu().numpy()
        energies = out.energy.detach().cpu().numpy()
        mov = x.movable.cpu().numpy()
        idx = x.batch.cpu().numpy()
        pos = x.positions.detach().cpu().numpy()
        for b in range(size):
            sel = idx == b
            f = forces[sel]
            res.positions.append(pos[sel])
            res.energies.append(float(energies[b]))
            res.forces.append(f)
            res.fmax.append(float(np.linalg.norm(f[mov[sel]], axis=1).max()) if mov[sel].any() else 0.0)
            res.relax_steps.append(int(steps[b]))
            res.valid.append(bool(valid[b]))
            res.reasons.append(reasons[b])
    bar.close()
    res.wall_time = time.perf_counter() - t0
    return res


def generated_doc_id(loaded: LoadedModel, system: SurfaceSystem, scfg: SampleConfig, seed: int, i: int) -> str:
    guided = bool(scfg.guidance and scfg.eta_dt > 0)
    return make_doc_id("generated", loaded.model_id, system.system_id, system.composition, scfg.sampler,
                       scfg.steps, guided, scfg.eta_dt, scfg.relax, scfg.relax_steps, scfg.batch_size, seed, i)


def generated_docs(
    res: GenerationResult, loaded: LoadedModel, scfg: SampleConfig, *, seed: int, run_id: str | None,
    checkpoint: str | None = None,
) -> list[StructureDoc]:
    system = res.system
    guided = bool(scfg.guidance and scfg.eta_dt > 0)
    docs = []
    for i in range(res.n):
        atoms = system.compose(res.positions[i][system.n_substrate :])
        atoms.positions = res.positions[i]
        doc_id = generated_doc_id(loaded, system, scfg, seed, i)
        docs.append(StructureDoc(
            doc_id=doc_id, source="generated", structure=atoms_to_structure_dict(atoms),
            composition=system.composition, formula=atoms.get_chemical_formula(), system_id=system.system_id,
            element=system.element, facet=system.facet, cell=system.cell, n_substrate=system.n_substrate,
            movable=system.movable.tolist(), fixed=system.fixed_indices.tolist(), z_box=list(system.z_box),
            in_box=bool(np.all(system.inside_box(atoms, tol=1e-3))), valid=res.valid[i],
            error=res.reasons[i] or None, energy=res.energies[i], forces=np.round(res.forces[i], 5).tolist(),
            fmax=res.fmax[i], steps=res.relax_steps[i], oracle="mlff", model_id=loaded.model_id,
            run_id=run_id, seed=seed,
            meta={"sampler": scfg.sampler, "diffusion_steps": scfg.steps, "guidance": guided,
                  "eta_dt": scfg.eta_dt, "mlff_relax": scfg.relax, "mlff_relax_steps": res.relax_steps[i],
                  "index": i, "checkpoint": checkpoint, "wall_time_batch": res.wall_time},
        ))
    return docs


def sample_into_store(
    store: ResultsStore, loaded: LoadedModel, system: SurfaceSystem, scfg: SampleConfig, *,
    n: int | None = None, seed: int | None = None, device="cpu", run_id: str | None = None,
    checkpoint: str | None = None, progress: bool = True,
) -> tuple[GenerationResult | None, list[StructureDoc]]:
    seed = scfg.seed if seed is None else seed
    n = scfg.n if n is None else n
    ids = [generated_doc_id(loaded, system, scfg, seed, i) for i in range(n)]
    if len(store.existing_ids(ids)) == n:  # finished before (resume): reuse, do not regenerate
        docs = [store.get(i) for i in ids]
        return None, docs
    res = generate(loaded, system, scfg, n=n, seed=seed, device=device, progress=progress)
    docs = generated_docs(res, loaded, scfg, seed=seed, run_id=run_id, checkpoint=checkpoint)
    store.put_many(docs)
    return res, docs
