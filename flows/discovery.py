"""The discovery pipeline (the paper's figure): RSS data -> train denoiser + MLFF -> guided sampling across
compositions and cells -> relax the best candidates -> everything in the store. Each stage's result is
handed to the next explicitly."""

from __future__ import annotations

from prefect import flow

from flows.common import resolve_study
from flows.relax import relax_flow
from flows.rss import rss_flow
from flows.sample import sample_flow
from flows.train import train_flow
from surfdiff_core.config import SurfdiffConfig


@flow(name="discovery", log_prints=True)
def discovery_flow(study: SurfdiffConfig | None = None, config_path: str | None = None,
                   store_path: str | None = None) -> dict:
    """Whole pipeline on one study. Rerunning after an interruption reuses every finished stage."""
    cfg = resolve_study(study, config_path, store_path)  # parsed once, before any work
    rss = rss_flow(study=cfg)
    model = train_flow(study=cfg, upstream=rss)
    samples = sample_flow(study=cfg, upstream=model)
    relaxed = relax_flow(study=cfg, upstream=samples)
    return {"study": cfg.name, "rss": rss.as_dict(ids=False), "model": model.as_dict(ids=False),
            "samples": samples.as_dict(ids=False), "relax": relaxed.as_dict(ids=False)}
