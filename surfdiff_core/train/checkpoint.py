"""Reading a trained model's checkpoint: the format tag the trainer writes, the loaded model with its generative
process and provenance (`load_checkpoint`), and a checkpoint's weights as the start of another training
(`warm_start`). Here in train/, the one package that may import both ml/ and diffusion/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.process import SurfaceDiffusion
from surfdiff_core.diffusion.schedule import VPSchedule
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.ml.models import ModelSpec, SurfaceModel

CHECKPOINT_FORMAT = "surfdiff-checkpoint-1"


@dataclass
class LoadedModel:
    model: SurfaceModel
    process: SurfaceDiffusion
    model_id: str
    meta: dict[str, Any]


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    p = Path(path)
    if not p.is_file():
        raise SurfdiffError(f"checkpoint not found: {p}")
    try:
        ck = torch.load(p, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SurfdiffError(f"cannot read checkpoint {p}: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise SurfdiffError(f"{p} is not a surfdiff checkpoint")
    model = SurfaceModel(ModelSpec.from_dict(ck["spec"]))
    model.load_state_dict(ck["state_dict"])
    model.to(device).eval()
    d = ck["diffusion"]
    if d.get("kind") == "flow":
        process = SurfaceFlow(length_scale=d["length_scale"], t_min=d["t_min"])
    else:
        process = SurfaceDiffusion(VPSchedule(d["beta_min"], d["beta_max"]), length_scale=d["length_scale"],
                                   t_min=d["t_min"])
    meta = {k: ck[k] for k in ("epoch", "best_val", "history", "data", "model_config")}
    return LoadedModel(model=model, process=process, model_id=ck["model_id"], meta=meta)


def warm_start(model: SurfaceModel, checkpoint: str | Path, device: torch.device) -> None:
    """Start from a trained model's (EMA) weights; the energy normalisation of the new data is kept."""
    ck = torch.load(checkpoint, map_location=device, weights_only=True)
    # through ModelSpec, so that a checkpoint written before a field was added compares with its default
    if ModelSpec.from_dict(ck.get("spec") or {}).to_dict() != model.spec.to_dict():
        raise SurfdiffError(f"cannot fine-tune from {checkpoint}: another architecture or element set")
    own = model.state_dict()
    normalisation = ("atomref", "energy_shift", "energy_scale")
    weights = {k: v for k, v in ck["state_dict"].items() if k in own and k not in normalisation}
    model.load_state_dict({**own, **weights})
