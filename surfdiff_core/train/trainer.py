"""Training of the denoiser and the MLFF from the results store.

Loss = w_s · DSM(score) + w_E · MSE(energy per atom) + w_F · MSE(forces), the authors' 1 / 0.01 / 0.99
weighting with one shared PaiNN representation (ModelConfig.shared). Adam with a cosine learning-rate
schedule, EMA weights (used for validation and saved as the model), validation split by structure, early
stopping, and checkpoints that hold weights, spec, normalisation statistics and data provenance. A run with the
same config and data has the same model id and resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surfdiff_core.config import ModelConfig, TrainConfig
from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.process import SurfaceDiffusion
from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.ml.models import ModelSpec, SurfaceModel
from surfdiff_core.progress import progress_bar
from surfdiff_core.store import ResultsStore
from surfdiff_core.train.checkpoint import CHECKPOINT_FORMAT, warm_start
from surfdiff_core.train.data import (
    DataScope,
    Sample,
    data_fingerprint,
    element_reference_energies,
    frame_batch,
    load_samples,
    structure_batch,
)

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SurfdiffError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def make_process(mcfg: ModelConfig) -> SurfaceDiffusion | SurfaceFlow:
    if mcfg.generative == "flow":
        return SurfaceFlow(length_scale=mcfg.length_scale)
    return SurfaceDiffusion(VPSchedule(mcfg.beta_min, mcfg.beta_max), length_scale=mcfg.length_scale)


def process_settings(process: SurfaceDiffusion | SurfaceFlow) -> dict[str, Any]:
    """What a checkpoint records of its generative process (read back by `load_checkpoint`)."""
    if isinstance(process, SurfaceFlow):
        return {"kind": "flow", "length_scale": process.length_scale, "t_min": process.t_min}
    return {"beta_min": process.schedule.beta_min, "beta_max": process.schedule.beta_max,
            "length_scale": process.length_scale, "t_min": process.t_min}


def make_model(mcfg: ModelConfig, elements: list[int]) -> SurfaceModel:
    spec = ModelSpec(n_features=mcfg.n_features, n_rbf=mcfg.n_rbf, n_interactions=mcfg.n_interactions,
                     cutoff=mcfg.cutoff, elements=sorted(elements), shared=mcfg.shared,
                     time_features=mcfg.time_features, energy_features=mcfg.energy_features)
    return SurfaceModel(spec)


@dataclass
class TrainingRun:
    model_id: str
    checkpoint: Path
    epochs: int
    best_val: float
    history: list[dict[str, float]] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    wall_time: float = 0.0
    samples_per_second: float = 0.0
    resumed_from: int = 0
    doc_ids: list[str] = field(default_factory=list)


class EMA:
    """Exponential moving average of the weights (the model that is validated and saved)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            s.copy_(b)


def model_id_for(mcfg: ModelConfig, tcfg: TrainConfig, fingerprint: str, scope: DataScope,
                 parent: str | None = None) -> str:
    # fields added for energy conditioning stay out of the id of an unconditioned model: its id is unchanged
    plain = mcfg.energy_features == 0
    # fields added later stay out of the id at their defaults, so earlier models keep their ids
    later = {*(("energy_features",) if plain else ()), *(("generative",) if mcfg.generative == "diffusion" else ())}
    parts = [mcfg.model_dump(mode="json", exclude=later),
             # the committee size does not change how this one model trains
             # init_from: the parent's id below says it (and a name would not say which weights)
             tcfg.model_dump(mode="json", exclude={"device", "ensemble", "init_from",
                                                   *(("condition_dropout",) if plain else ())}),
             fingerprint, scope.system_id, list(scope.energy_models), scope.study]
    if parent is not None:  # fine-tuned from another model: not the same as trained from scratch
        parts.append(parent)
    payload = json.dumps(parts, sort_keys=True)
    return "model-" + hashlib.sha1(payload.encode()).hexdigest()[:12]


def split_by_group(samples: list[Sample], val_fraction: float,
                   rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Validation split by group: tiles of a structure, and relaxations of one candidate, never straddle it."""
    groups = sorted({s.group for s in samples})
    order = rng.permutation(len(groups))
    n_val = int(round(val_fraction * len(groups))) if len(groups) >= 5 else 0
    val_groups = {groups[i] for i in order[:n_val]}
    return ([s for s in samples if s.group not in val_groups], [s for s in samples if s.group in val_groups])


def _score_loss(model: SurfaceModel, process: SurfaceDiffusion, samples: list[Sample], tcfg: TrainConfig,
                device: torch.device, gen: torch.Generator) -> torch.Tensor:
    batch = structure_batch(samples, device)
    t = process.t_min + (1 - process.t_min) * torch.rand(batch.n_structures, generator=gen, device=device)
    noisy, eps_target = process.perturb(batch, t, generator=gen)
    condition = None
    if model.energy_condition is not None:  # classifier-free guidance: some structures learn the null score
        condition = torch.as_tensor([s.e_diff for s in samples], dtype=t.dtype, device=device)
        dropped = torch.rand(len(samples), generator=gen, device=device) < tcfg.condition_dropout
        condition = torch.where(dropped, torch.full_like(condition, math.nan), condition)
    out = model(noisy, t, score=True, condition=condition)
    return process.training_loss(out.eps, eps_target, noisy)


def _losses(
    model: SurfaceModel, process: SurfaceDiffusion, samples: list[Sample], tcfg: TrainConfig,
    device: torch.device, gen: torch.Generator, rng: np.random.Generator, *, create_graph: bool,
    force_scale: float,
    energy_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    minima = [s for s in samples if s.denoise]
    if tcfg.score_weight > 0 and minima:
        loss_score = _score_loss(model, process, minima, tcfg, device, gen)
    else:  # an MLFF-only model (a committee member), or only single points here: no denoiser forward at all
        loss_score = torch.zeros((), device=device)
    fb, e_ref, f_ref = frame_batch(samples, rng, device)
    mo = model(fb, None, score=False, energy=True, forces=True, training_forces=create_graph)
    n_atoms = fb.atoms_per_structure().to(e_ref.dtype)
    std = energy_scale or model.energy_std  # per-atom energy error measured in units of the data's spread
    loss_e = (((mo.energy - e_ref) / n_atoms / std) ** 2).mean()
    loss_f = (((mo.forces - f_ref) / force_scale) ** 2).mean()
    total = tcfg.score_weight * loss_score + tcfg.energy_weight * loss_e + tcfg.forces_weight * loss_f
    return {"loss": total, "score": loss_score, "energy": loss_e, "forces": loss_f}


def train(
    store: ResultsStore,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    *,
    scope: DataScope,
    checkpoint_dir: str | Path,
    progress: bool = True,
    max_epochs: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    init_from: str | Path | None = None,
) -> TrainingRun:
    """Train (or resume) the denoiser + MLFF on the documents of `scope`; returns the checkpoint.
    `init_from`: a checkpoint whose weights start the training (fine-tuning, e.g. an active-learning round)."""
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    device = pick_device(tcfg.device)
    samples, doc_ids = load_samples(store, scope, tcfg)
    fingerprint = data_fingerprint(doc_ids)
    model_id = model_id_for(mcfg, tcfg, fingerprint, scope, Path(init_from).stem if init_from else None)
    ckdir = Path(checkpoint_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckdir / f"{model_id}-last.pt", ckdir / f"{model_id}.pt"

    train_set, val_set = split_by_group(samples, tcfg.val_fraction, rng)

    elements = sorted({int(z) for s in samples for z in s.atoms.numbers})
    model = make_model(mcfg, elements).to(device)
    mu, energy_scale = element_reference_energies(train_set, elements)
    force_scale = float(np.sqrt(np.mean(np.concatenate([f for s in train_set for *_, f in s.frames]) ** 2)))
    force_scale = max(force_scale, 1e-2)
    # The energy head's output is scaled by the force RMS (eV/Å × 1 Å, as NequIP does), not by the per-atom
    # energy spread: forces drive guidance and relaxation, and this scale learned them 2.4x better in 15 epochs
    # of the demo data (validation force loss 0.25 against 0.59).
    model.set_energy_normalisation(dict(zip(elements, mu.tolist(), strict=True)), force_scale)
    if model.energy_condition is not None:  # E_diff features span the data's range
        spread = float(np.quantile([s.e_diff for s in train_set if s.denoise] or [0.0], 0.9))
        model.energy_condition.scale.fill_(max(spread, 1e-3))
    if init_from is not None:
        warm_start(model, init_from, device)
    process = make_process(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    epochs = max_epochs or tcfg.epochs
    steps_per_epoch = max(1, math.ceil(len(train_set) / tcfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=tcfg.lr_min)
    ema = EMA(model, tcfg.ema_decay)
    history: list[dict[str, float]] = []
    start_epoch, best_val, bad_epochs = 0, math.inf, 0

    if not last_path.exists():  # the resume state deleted (to save space) after a finished run: reuse that run
        done = _finished_run(best_path, model_id, epochs, tcfg.patience)
        if done is not None:
            return TrainingRun(model_id=model_id, checkpoint=best_path, epochs=len(done["history"]),
                               best_val=float(done["best_val"]), history=list(done["history"]),
                               n_train=len(train_set), n_val=len(val_set), resumed_from=len(done["history"]),
                               doc_ids=list(doc_ids))
    else:  # resume, unless the checkpoint cannot be read (truncated by a full disk, a copy)
        fresh = [copy.deepcopy(x.state_dict()) for x in (model, ema.shadow, opt, sched)]
        try:
            ck = torch.load(last_path, map_location=device, weights_only=True)
            model.load_state_dict(ck["raw_state_dict"])
            ema.shadow.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch, best_val, bad_epochs = int(ck["epoch"]), float(ck["best_val"]), int(ck["bad_epochs"])
            history = list(ck["history"])
            rng = np.random.default_rng([tcfg.seed, start_epoch])
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: keep it aside, start over
            for target, state in zip((model, ema.shadow, opt, sched), fresh, strict=True):
                target.load_state_dict(state)  # undo what a half-applied checkpoint changed
            start_epoch, best_val, bad_epochs, history = 0, math.inf, 0, []
            stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
            aside = last_path.with_name(f"{last_path.name}.corrupt-{stamp}")
            while aside.exists():  # a second one within the second keeps the first
                n += 1
                aside = last_path.with_name(f"{last_path.name}.corrupt-{stamp}-{n}")
            os.replace(last_path, aside)
            logger.warning("train: the checkpoint %s cannot be read (%s); moved it to %s and training starts over",
                           last_path, type(exc).__name__, aside.name)

    gen = torch.Generator(device=device).manual_seed(tcfg.seed + start_epoch)
    provenance = {"system_id": scope.system_id, "study": scope.study,
                  "energy_models": list(scope.energy_models), "fingerprint": fingerprint, "n_structures": len(doc_ids),
                  "doc_ids": doc_ids, "train": tcfg.model_dump(mode="json"), "n_train": len(train_set),
                  "n_val": len(val_set), "parent": Path(init_from).stem if init_from else None}

    def save(path: Path, epoch_done: int, bad: int) -> None:
        _save(path, ema.shadow, model, opt, sched, epoch_done, best_val, bad, history, model_id, mcfg, process,
              provenance, force_scale)

    t0, seen = time.perf_counter(), 0
    bar = progress_bar(range(start_epoch, epochs), desc=f"train {model_id}", unit="epoch", disable=not progress,
                       initial=start_epoch, total=epochs, dynamic_ncols=True)
    epoch = start_epoch
    finished = start_epoch >= epochs or bad_epochs >= tcfg.patience  # a finished run resumed: nothing to do
    for epoch in bar:
        if finished:
            break
        model.train()
        perm = rng.permutation(len(train_set))
        sums: dict[str, float] = {}
        for k in range(steps_per_epoch):
            chunk = [train_set[i] for i in perm[k * tcfg.batch_size : (k + 1) * tcfg.batch_size]]
            if not chunk:
                continue
            losses = _losses(model, process, chunk, tcfg, device, gen, rng, create_graph=True,
                             force_scale=force_scale, energy_scale=energy_scale)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            ema.update(model)
            seen += len(chunk)
            for name, v in losses.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / steps_per_epoch
        row = {f"train_{k}": v for k, v in sums.items()}
        val = _validate(ema.shadow, process, val_set or train_set, tcfg, device, force_scale, energy_scale)
        row.update({f"val_{k}": v for k, v in val.items()}, epoch=epoch + 1, lr=sched.get_last_lr()[0])
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{val['loss']:.3f}", score=f"{val['score']:.3f}",
                        F=f"{val['forces']:.3f}", refresh=False)  # shown by the next step, at its interval
        if on_epoch:
            on_epoch(epoch + 1, row)
        if val["loss"] < best_val - 1e-6:
            best_val, bad_epochs = val["loss"], 0
            save(best_path, epoch + 1, 0)
        else:
            bad_epochs += 1
        save(last_path, epoch + 1, bad_epochs)
        if bad_epochs >= tcfg.patience:
            break
    bar.close()
    wall = time.perf_counter() - t0
    if not best_path.exists():  # zero epochs left on resume of a finished run: keep the last weights
        save(best_path, epoch, bad_epochs)
    _mark_finished(best_path, len(history), bad_epochs, device)
    return TrainingRun(model_id=model_id, checkpoint=best_path, epochs=len(history), best_val=best_val,
                       history=history, n_train=len(train_set), n_val=len(val_set), wall_time=wall,
                       samples_per_second=seen / wall if wall > 0 else 0.0, resumed_from=start_epoch,
                       doc_ids=list(doc_ids))


@torch.no_grad()
def _validate(model, process, samples, tcfg, device, force_scale, energy_scale) -> dict[str, float]:
    """Validation with fixed noise (seeded) so epochs are comparable."""
    gen = torch.Generator(device=device).manual_seed(12345)
    rng = np.random.default_rng(12345)
    totals: dict[str, float] = {}
    n = 0
    for k in range(0, len(samples), tcfg.batch_size):
        chunk = samples[k : k + tcfg.batch_size]
        with torch.enable_grad():
            losses = _losses(model, process, chunk, tcfg, device, gen, rng, create_graph=False,
                             force_scale=force_scale, energy_scale=energy_scale)
        for name, v in losses.items():
            totals[name] = totals.get(name, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    return {k: v / max(n, 1) for k, v in totals.items()}


def _save(path, ema_model, raw_model, opt, sched, epoch, best_val, bad_epochs, history, model_id, mcfg, process,
          provenance, force_scale) -> None:
    ck = {
        "format": CHECKPOINT_FORMAT, "model_id": model_id, "spec": ema_model.spec.to_dict(),
        "model_config": mcfg.model_dump(mode="json"),
        "diffusion": process_settings(process),
        "state_dict": ema_model.state_dict(), "raw_state_dict": raw_model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
        "best_val": best_val, "bad_epochs": bad_epochs, "history": history, "data": provenance,
        "force_scale": force_scale,
    }
    _write_atomically(ck, path)


def _write_atomically(ck: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint


def _mark_finished(best_path: Path, epochs_done: int, bad_epochs: int, device) -> None:
    """Record in the best checkpoint where the run ended, so that it is reused even without its resume state."""
    ck = torch.load(best_path, map_location=device, weights_only=True)
    final = {"epochs": epochs_done, "bad_epochs": bad_epochs}
    if ck.get("finished") != final:  # unchanged: leave the file (and its registered sha256) as it is
        ck["finished"] = final
        _write_atomically(ck, best_path)


def _finished_run(best_path: Path, model_id: str, epochs: int, patience: int) -> dict | None:
    """The best checkpoint of a run of `model_id` that ended at or beyond `epochs` (or by patience), else None."""
    if not best_path.exists():
        return None
    try:
        ck = torch.load(best_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: train as if it were not there
        return None
    final = ck.get("finished")
    if ck.get("model_id") != model_id or not final:
        return None
    return ck if final["epochs"] >= epochs or final["bad_epochs"] >= patience else None
