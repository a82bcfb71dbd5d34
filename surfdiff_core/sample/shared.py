"""Shared batches across the targets of a sweep: structures of different cells and sizes in one batch.

With `sample.share_batches`, the samples of every target are laid out target by target (target 0's n samples,
then target 1's, ...) and cut into batches of `sample.batch_size`, so a batch may hold the last samples of one
cell and the first of the next: each batch is one pass of the sampler, the guidance, the MLFF relaxation and
the validity check over structures of different cells (SlabBatch carries a cell and a box per structure). Each
batch is written to the store as it finishes and has its own random stream, so a killed run loses at most one
batch and a rerun generates only the batches with a missing document. Unconditioned sampling only (inpainting,
seeds and novelty guidance are per target).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from surfdiff_core.diffusion.guidance import ForceFieldGuidance
from surfdiff_core.diffusion.repulsion import OverlapRepulsion
from surfdiff_core.errors import ConfigError
from surfdiff_core.ml.committee import Committee
from surfdiff_core.progress import progress_bar
from surfdiff_core.relax.mlff import mlff_relax
from surfdiff_core.sample.conditioning import make_sampler
from surfdiff_core.sample.generate import (
    BatchOutputs,
    GenerationResult,
    check_model_elements,
    conditioned_denoiser,
    generated_doc_id,
    generated_docs,
    mixed_prior_batch,
)
from surfdiff_core.store import ResultsStore, StructureDoc
from surfdiff_core.system import SurfaceSystem
from surfdiff_core.train.checkpoint import LoadedModel

SHARED_STREAM = 7_777  # batch k's random stream is (seed, SHARED_STREAM, k): apart from per-target batches


def shared_generator(seed: int, k: int, device) -> torch.Generator:
    sub = int(np.random.SeedSequence([seed, SHARED_STREAM, k]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(sub)


@dataclass(frozen=True)
class Slot:
    target: int  # index into the systems
    index: int  # the sample's number within its target


def layout(n_targets: int, n: int, batch_size: int) -> list[list[Slot]]:
    """Target-major slots cut into batches: deterministic, so a rerun finds the same batches."""
    slots = [Slot(t, i) for t in range(n_targets) for i in range(n)]
    return [slots[k : k + batch_size] for k in range(0, len(slots), batch_size)]


def unconditioned(scfg) -> bool:
    return scfg.inpaint is None and scfg.seed_structure is None and scfg.novelty <= 0


def sample_shared(store: ResultsStore, loaded: LoadedModel, systems: Sequence[SurfaceSystem], scfg, *,
                  device="cpu", run_id: str | None = None, checkpoint: str | None = None, progress: bool = True,
                  study: str | None = None, committee: Sequence[LoadedModel] = ()
                  ) -> tuple[list[list[StructureDoc]], dict]:
    """Every target's `scfg.n` samples through shared batches; per target its documents (in sample order),
    and what ran: {'batches', 'reused_batches' per target, 'wall_time', 'structure_steps'}."""
    if not unconditioned(scfg):
        raise ConfigError("sample.share_batches samples without inpainting, seed structures or novelty guidance "
                          "(they are per target): turn one of them off")
    for member in (loaded, *committee):
        for system in systems:
            check_model_elements(member, system)
    member_ids = [m.model_id for m in committee]
    ids = [[generated_doc_id(loaded.model_id, s, scfg, scfg.seed, i, member_ids) for i in range(scfg.n)]
           for s in systems]
    have = store.existing_ids([i for per in ids for i in per])
    batches = layout(len(systems), scfg.n, scfg.batch_size)
    todo = [k for k, b in enumerate(batches) if not all(ids[s.target][s.index] in have for s in b)]
    reused = [sum(1 for k, b in enumerate(batches) if k not in todo and any(s.target == t for s in b))
              for t in range(len(systems))]
    model, process = loaded.model.to(device).eval(), loaded.process
    mlff = Committee([model, *(m.model.to(device).eval() for m in committee)])
    denoise, relax_forces = conditioned_denoiser(model, scfg), mlff
    if scfg.repulsion > 0:
        wall = OverlapRepulsion(scale=scfg.repulsion)
        denoise, relax_forces = wall.wrap(denoise), wall.wrap(relax_forces)
    sampler = make_sampler(scfg)
    guidance = ForceFieldGuidance(eta_dt=scfg.eta_dt) if scfg.guidance and scfg.eta_dt > 0 else None
    bar = progress_bar(total=sum(len(batches[k]) for k in todo), desc=f"sample {len(systems)} targets, shared "
                       f"batches", unit="struct", disable=not progress, dynamic_ncols=True)
    t0, structure_steps = time.perf_counter(), 0
    left = [sum(1 for k in todo for s in batches[k] if s.target == t) for t in range(len(systems))]
    for k in todo:
        batch = batches[k]
        gen = shared_generator(scfg.seed, k, device)
        x = process.sample_prior(mixed_prior_batch([systems[slot.target] for slot in batch], device),
                                 generator=gen)
        tb = time.perf_counter()
        x = sampler(denoise, x, process, steps=scfg.steps, guidance=guidance, generator=gen)
        structure_steps += len(batch) * scfg.steps
        steps = [0] * len(batch)
        if scfg.relax and scfg.relax_steps > 0:
            relaxed, info = mlff_relax(relax_forces, x, steps=scfg.relax_steps)
            x = x.with_positions(relaxed.positions)
            steps = info.steps.tolist()
        _write_batch(store, loaded, scfg, systems, batch, BatchOutputs.of(x, mlff, steps),
                     wall_time=time.perf_counter() - tb, run_id=run_id, checkpoint=checkpoint, study=study,
                     committee=member_ids)
        bar.update(len(batch))
        for slot in batch:
            left[slot.target] -= 1
        bar.set_postfix(targets_complete=f"{sum(v == 0 for v in left)}/{len(systems)}")
    bar.close()
    wanted = [i for per in ids for i in per]
    by_id = {d.doc_id: d for d in store.find({"doc_id": {"$in": wanted}})}
    docs = [[by_id[i] for i in per if i in by_id] for per in ids]
    return docs, {"batches": [-(-scfg.n // scfg.batch_size)] * len(systems), "reused_batches": reused,
                  "wall_time": time.perf_counter() - t0, "structure_steps": structure_steps}


def _write_batch(store, loaded, scfg, systems, batch: list[Slot], outputs: BatchOutputs, *, wall_time,
                 run_id, checkpoint, study, committee) -> None:
    """The batch's documents, target by target (a batch's slots of one target are consecutive samples)."""
    parts: dict[int, tuple[int, GenerationResult]] = {}
    for b, slot in enumerate(batch):
        _, part = parts.setdefault(slot.target, (slot.index, GenerationResult(system=systems[slot.target])))
        part.add_from_batch(b, outputs)
    docs = []
    for first, part in parts.values():
        part.wall_time = wall_time
        docs += generated_docs(part, loaded, scfg, seed=scfg.seed, run_id=run_id, checkpoint=checkpoint,
                               study=study, first_index=first, committee=committee)
    store.put_many(docs)
