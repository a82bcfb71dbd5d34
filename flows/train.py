"""Training flow: denoiser + MLFF from the store's RSS data (GPU when present), resumable by model id."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, load, show_progress
from surfdiff_core.report import loss_curves, png_markdown
from surfdiff_core.stages.common import data_root, run_train, store_for, summary_dict


@task(retries=1, retry_delay_seconds=5)
def train_task(config_path: str, store_path: str | None, epochs: int | None) -> dict:
    cfg = load(config_path)
    with store_for(cfg, store_path) as store:
        s = run_train(cfg, store, store_path=store_path, epochs=epochs, progress=show_progress())
    out = summary_dict(s)
    out["history"] = s.history
    return out


@flow(name="train", log_prints=True)
def train_flow(config_path: str = "configs/demo.yaml", store_path: str | None = None,
               epochs: int | None = None) -> dict:
    """Train the PaiNN denoiser and MLFF (one shared representation) on the RSS data."""
    cfg = load(config_path)
    res = train_task(config_path, store_path, epochs)
    if res["history"]:
        png = loss_curves(res["history"], data_root(cfg, store_path) / "figures" / f"{res['model_id']}-loss.png")
        create_markdown_artifact(
            key=artifact_key(f"{cfg.name}-training"),
            markdown=f"# Training {res['model_id']}\n\nepochs {res['epochs']}, best validation loss "
                     f"{res['best_val']:.4f}, {res['n_train']} train / {res['n_val']} validation structures\n\n"
                     f"{png_markdown(png, 'losses')}\n",
        )
    print(f"model {res['model_id']} -> {res['checkpoint']}")
    res.pop("history")
    return res
