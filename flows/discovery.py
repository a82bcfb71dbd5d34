"""The discovery pipeline (the paper's figure): RSS data -> train denoiser + MLFF -> guided sampling across
compositions and cells -> relax the best candidates -> everything in the store."""

from __future__ import annotations

from prefect import flow

from flows.common import load
from flows.relax import relax_flow
from flows.rss import rss_flow
from flows.sample import sample_flow
from flows.train import train_flow


@flow(name="discovery", log_prints=True)
def discovery_flow(config_path: str = "configs/demo.yaml", store_path: str | None = None,
                   rss_n: int | None = None) -> dict:
    """Whole pipeline on one config. Rerunning after an interruption reuses every finished stage."""
    load(config_path)  # validated once, before any work
    rss = rss_flow(config_path, n=rss_n, store_path=store_path)
    model = train_flow(config_path, store_path=store_path)
    samples = sample_flow(config_path, checkpoint=model["checkpoint"], store_path=store_path)
    relaxed = relax_flow(config_path, store_path=store_path)
    return {"rss": rss, "model": model, "samples": samples, "relax": relaxed}
