"""Guided generation into any cell and composition, and its documents in the store.

A trained checkpoint (denoiser + MLFF) samples `n` structures of a SurfaceSystem in batches on the
accelerator: uniform prior over the confinement box, reverse SDE (or probability-flow ODE) with force-field
guidance, a short batched MLFF relaxation (both with a short-range overlap wall, diffusion/repulsion.py),
then validity checks (distances < 1 Å or atoms outside the box are rejected and counted). Every sample
becomes a `generated` document with full provenance.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from surfdiff_core.config import SampleConfig
from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.guidance import ForceFieldGuidance
from surfdiff_core.diffusion.repulsion import OverlapRepulsion
from surfdiff_core.diffusion.validity import check_validity
from surfdiff_core.errors import ConfigError, SurfdiffError
from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.ml.committee import Committee
from surfdiff_core.progress import progress_bar
from surfdiff_core.relax.mlff import mlff_relax
from surfdiff_core.sample.conditioning import Conditioning, id_parts, make_sampler, resolve_conditioning
from surfdiff_core.store import ResultsStore, StructureDoc, make_doc_id
from surfdiff_core.store.documents import atoms_to_structure_dict
from surfdiff_core.system import SurfaceSystem
from surfdiff_core.train.checkpoint import LoadedModel


@dataclass
class GenerationResult:
    system: SurfaceSystem
    positions: list[np.ndarray] = field(default_factory=list)  # full slab positions per sample
    energies: list[float | None] = field(default_factory=list)
    energy_std: list[float | None] = field(default_factory=list)  # committee spread (None: one model)
    forces: list[np.ndarray] = field(default_factory=list)
    fmax: list[float] = field(default_factory=list)
    relax_steps: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    wall_time: float = 0.0
    structure_steps: int = 0
    conditioning: dict = field(default_factory=dict)  # what sample.inpaint / seed_structure fixed (document meta)

    @property
    def n(self) -> int:
        return len(self.valid)

    def extend(self, other: GenerationResult) -> None:
        for name in ("positions", "energies", "energy_std", "forces", "fmax", "relax_steps", "valid", "reasons"):
            getattr(self, name).extend(getattr(other, name))
        self.structure_steps += other.structure_steps

    @property
    def rejection_rate(self) -> float:
        return 1.0 - sum(self.valid) / self.n if self.n else 0.0

    def add_from_batch(self, b: int, outputs: BatchOutputs, positions: np.ndarray | None = None) -> None:
        """Append structure b of a finished batch (`positions`: its positions as restored, if not the batch's)."""
        sel = outputs.index == b
        f = outputs.forces[sel]
        mov = outputs.movable[sel]
        self.positions.append(outputs.positions[sel] if positions is None else positions)
        self.energies.append(float(outputs.energies[b]))
        self.energy_std.append(float(outputs.spread[b]) if outputs.several else None)
        self.forces.append(f)
        self.fmax.append(float(np.linalg.norm(f[mov], axis=1).max()) if mov.any() else 0.0)
        self.relax_steps.append(int(outputs.steps[b]))
        self.valid.append(bool(outputs.valid[b]))
        self.reasons.append(outputs.reasons[b])


@dataclass
class BatchOutputs:
    """A finished batch on the host: the MLFF's energies, spread and forces, validity and relaxation steps."""

    positions: np.ndarray
    index: np.ndarray  # structure of each atom
    movable: np.ndarray
    forces: np.ndarray
    energies: np.ndarray
    spread: np.ndarray
    valid: list
    reasons: list
    steps: list[int]
    several: bool  # a committee: the spread is meaningful

    @classmethod
    def of(cls, x: SlabBatch, mlff: Committee, steps: list[int]) -> BatchOutputs:
        out = mlff.predict(x)
        valid, reasons = check_validity(x, min_distance=1.0)
        return cls(positions=x.positions.detach().cpu().numpy(), index=x.batch.cpu().numpy(),
                   movable=x.movable.cpu().numpy(), forces=out.forces.detach().cpu().numpy(),
                   energies=out.energy.detach().cpu().numpy(), spread=out.energy_std.detach().cpu().numpy(),
                   valid=valid, reasons=reasons, steps=steps, several=len(mlff) > 1)


def _unknown_elements(loaded: LoadedModel, system: SurfaceSystem) -> set[str]:
    from ase.data import atomic_numbers

    known = set(loaded.model.spec.elements)
    symbols = set(system.template.get_chemical_symbols()) | set(system.overlayer)
    return {s for s in symbols if atomic_numbers[s] not in known}


def check_model_elements(loaded: LoadedModel, system: SurfaceSystem) -> None:
    missing = _unknown_elements(loaded, system)
    if missing:
        raise SurfdiffError(f"model {loaded.model_id} was not trained on {', '.join(sorted(missing))}: "
                            f"cannot sample {system.composition}")


def prior_batch(system: SurfaceSystem, n: int, device, dtype=torch.float32) -> SlabBatch:
    return mixed_prior_batch([system] * n, device, dtype)


def mixed_prior_batch(systems: Sequence[SurfaceSystem], device, dtype=torch.float32) -> SlabBatch:
    """One template structure per entry (systems may differ: cells, sizes), overlayer at the box's middle."""
    atoms = [s.compose(np.tile(np.mean(s.z_box), (len(s.overlayer), 3))) for s in systems]
    return collate(atoms, [s.movable for s in systems], [s.z_box for s in systems], device=device, dtype=dtype)


def batch_generator(seed: int, k: int, device) -> torch.Generator:
    """Batch k has its own random stream, so a resumed run regenerates exactly the batches it lost."""
    sub = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(sub)


def generate(
    loaded: LoadedModel,
    system: SurfaceSystem,
    scfg: SampleConfig,
    *,
    n: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    batches: list[int] | None = None,
    on_batch: Callable[[int, GenerationResult], None] | None = None,
    committee: Sequence[LoadedModel] = (),
    conditioning: Conditioning | None = None,
) -> GenerationResult:
    """Sample `n` structures in batches of scfg.batch_size (only the batch numbers in `batches` when given);
    `on_batch(k, result_of_batch_k)` runs as each batch finishes (the store write, for resumable runs).
    `committee`: MLFF-only models whose mean with this model's MLFF relaxes and scores the samples (guidance
    stays with the sampling model). `conditioning`: the resolved sample.inpaint / seed_structure (resolved here
    from files when not given); fixed atoms keep their given coordinates exactly, relaxation included."""
    for member in (loaded, *committee):
        check_model_elements(member, system)
    n = scfg.n if n is None else n
    seed = scfg.seed if seed is None else seed
    model, process = loaded.model.to(device).eval(), loaded.process
    if (scfg.sampler == "flow") != isinstance(process, SurfaceFlow):  # raised before anything is written
        kind = "a flow-matching" if isinstance(process, SurfaceFlow) else "a diffusion"
        raise ConfigError(f"model {loaded.model_id} is {kind} model: sample.sampler {scfg.sampler!r} cannot "
                          f"sample it ('flow' for flow matching; 'em', 'ode', 'ddim', 'pc' or 'ffc' for diffusion)")
    mlff = Committee([model, *(m.model.to(device).eval() for m in committee)])
    denoise, relax_forces = conditioned_denoiser(model, scfg), mlff
    if scfg.repulsion > 0:
        wall = OverlapRepulsion(scale=scfg.repulsion)
        denoise, relax_forces = wall.wrap(denoise), wall.wrap(relax_forces)
    cond = conditioning if conditioning is not None else resolve_conditioning(scfg, system, None)
    cond.check(process, scfg)
    sampler, n_steps = make_sampler(scfg), cond.steps(process, scfg.steps)
    guidance = ForceFieldGuidance(eta_dt=scfg.eta_dt) if scfg.guidance and scfg.eta_dt > 0 else None
    guidance = cond.guidance(guidance, scfg, process, system, device)
    res = GenerationResult(system=system, conditioning=cond.meta(scfg, system))
    t0 = time.perf_counter()
    todo = list(range(-(-n // scfg.batch_size))) if batches is None else list(batches)
    bar = progress_bar(total=len(todo) * n_steps, desc=f"sample {system.composition} {system.cell}", unit="step",
                       disable=not progress, dynamic_ncols=True)
    for k in todo:
        size = min(scfg.batch_size, n - k * scfg.batch_size)
        gen = batch_generator(seed, k, device)
        part = GenerationResult(system=system, conditioning=res.conditioning)
        tb = time.perf_counter()
        x, proc = cond.start(process, prior_batch(system, size, device), system, gen)
        known = cond.known(x, system)
        x = cond.sampler(sampler, known)(denoise, x, proc, steps=n_steps, guidance=guidance,
                                         callback=lambda i, t, b: bar.update(1), generator=gen)
        part.structure_steps = size * n_steps
        if scfg.relax and scfg.relax_steps > 0:
            relaxed, info = mlff_relax(relax_forces, cond.hold(x, known), steps=scfg.relax_steps)
            x = x.with_positions(relaxed.positions)
            steps = info.steps.tolist()
        else:
            steps = [0] * size
        outputs = BatchOutputs.of(x, mlff, steps)
        for b in range(size):
            part.add_from_batch(b, outputs, cond.restore(outputs.positions[outputs.index == b], system))
        part.wall_time = time.perf_counter() - tb
        if on_batch:
            on_batch(k, part)
        res.extend(part)
    bar.close()
    res.wall_time = time.perf_counter() - t0
    return res


def conditioned_denoiser(model, scfg: SampleConfig):
    """The sampler's model call: plain, or steered to E_diff = scfg.energy_target by classifier-free guidance."""
    if scfg.energy_target is None:
        return model.denoise
    if model.energy_condition is None:  # raised before the first batch: nothing is written
        raise ConfigError("sample.energy_target needs an energy-conditioned model (train with "
                            "model.energy_features > 0), or leave energy_target out")
    return functools.partial(model.denoise, condition=scfg.energy_target, cfg_scale=scfg.cfg_scale)


def generated_doc_id(model_id: str, system: SurfaceSystem, scfg: SampleConfig, seed: int, i: int,
                     committee: Sequence[str] = ()) -> str:
    guided = bool(scfg.guidance and scfg.eta_dt > 0)
    # the energy condition and the committee join the id only when set: samples without them keep their ids
    conditioned = () if scfg.energy_target is None else (scfg.energy_target, scfg.cfg_scale)
    repelled = () if scfg.repulsion == 0 else ("repulsion", scfg.repulsion)
    ranked_by = ("committee", *committee) if committee else ()
    return make_doc_id("generated", model_id, system.system_id, system.composition, scfg.sampler,
                       scfg.steps, guided, scfg.eta_dt, scfg.relax, scfg.relax_steps, scfg.batch_size, seed, i,
                       *conditioned, *repelled, *ranked_by, *id_parts(scfg))


def generated_docs(
    res: GenerationResult, loaded: LoadedModel, scfg: SampleConfig, *, seed: int, run_id: str | None,
    checkpoint: str | None = None, study: str | None = None, first_index: int = 0, committee: Sequence[str] = (),
) -> list[StructureDoc]:
    """Documents of the samples in `res`, whose first one is sample number `first_index` of the run;
    `committee`: the ids of the MLFF-only models whose mean with this model relaxed and scored them."""
    system = res.system
    guided = bool(scfg.guidance and scfg.eta_dt > 0)
    docs = []
    for j in range(res.n):
        i = first_index + j
        atoms = system.compose(res.positions[j][system.n_substrate :])
        atoms.positions = res.positions[j]
        doc_id = generated_doc_id(loaded.model_id, system, scfg, seed, i, committee)
        docs.append(StructureDoc(
            doc_id=doc_id, source="generated", study=study, energy_model=f"mlff:{loaded.model_id}",
            structure=atoms_to_structure_dict(atoms),
            composition=system.composition, formula=atoms.get_chemical_formula(), system_id=system.system_id,
            element=system.element, facet=system.facet, cell=system.cell, n_substrate=system.n_substrate,
            movable=system.movable.tolist(), fixed=system.fixed_indices.tolist(), z_box=list(system.z_box),
            in_box=bool(np.all(system.inside_box(atoms, tol=1e-3))), valid=res.valid[j],
            error=res.reasons[j] or None, energy=res.energies[j], forces=np.round(res.forces[j], 5).tolist(),
            fmax=res.fmax[j], steps=res.relax_steps[j], oracle="mlff", model_id=loaded.model_id,
            run_id=run_id, seed=seed,
            meta={"sampler": scfg.sampler, "diffusion_steps": scfg.steps, "guidance": guided,
                  "eta_dt": scfg.eta_dt, "mlff_relax": scfg.relax, "mlff_relax_steps": res.relax_steps[j],
                  "index": i, "checkpoint": checkpoint, "wall_time_batch": res.wall_time,
                  "energy_target": scfg.energy_target, "repulsion": scfg.repulsion,
                  "cfg_scale": None if scfg.energy_target is None else scfg.cfg_scale,
                  "committee": list(committee), "mlff_energy_std": res.energy_std[j],
                  **_corrector_meta(scfg), **res.conditioning},
        ))
    return docs


def _corrector_meta(scfg: SampleConfig) -> dict:
    if scfg.sampler == "pc":
        return {"corrector": {"steps": scfg.corrector_steps, "snr": scfg.snr}}
    if scfg.sampler == "ffc":
        return {"corrector": {"steps": scfg.corrector_steps, "step": scfg.corrector_step,
                              "t_max": scfg.corrector_t_max}}
    return {}


def sample_into_store(
    store: ResultsStore, loaded: LoadedModel, system: SurfaceSystem, scfg: SampleConfig, *,
    n: int | None = None, seed: int | None = None, device="cpu", run_id: str | None = None,
    checkpoint: str | None = None, progress: bool = True, study: str | None = None,
    committee: Sequence[LoadedModel] = (),
) -> tuple[GenerationResult | None, list[StructureDoc]]:
    """Generate into the store batch by batch: each batch is written as it finishes, so a killed run loses at
    most one batch, and a rerun generates only the batches that are missing."""
    seed = scfg.seed if seed is None else seed
    n = scfg.n if n is None else n
    member_ids = [m.model_id for m in committee]
    ids = [generated_doc_id(loaded.model_id, system, scfg, seed, i, member_ids) for i in range(n)]
    have = store.existing_ids(ids)
    bs = scfg.batch_size
    missing = [k for k in range(-(-n // bs)) if not all(i in have for i in ids[k * bs : (k + 1) * bs])]
    res = None
    if missing:
        def write(k: int, part: GenerationResult) -> None:
            store.put_many(generated_docs(part, loaded, scfg, seed=seed, run_id=run_id, checkpoint=checkpoint,
                                          study=study, first_index=k * bs, committee=member_ids))

        res = generate(loaded, system, scfg, n=n, seed=seed, device=device, progress=progress,
                       batches=missing, on_batch=write, committee=committee,
                       conditioning=resolve_conditioning(scfg, system, store, study))
    by_id = {d.doc_id: d for d in store.find({"doc_id": {"$in": ids}})}
    return res, [by_id[i] for i in ids if i in by_id]
