"""What every flow shares: the config (validated once, per run), the store, and artifacts."""

from __future__ import annotations

import os

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from surfdiff_core.config import SurfdiffConfig, load_config
from surfdiff_core.query import best_per_group
from surfdiff_core.report import energy_histogram, markdown_table, png_markdown, structure_views
from surfdiff_core.stages.common import data_root
from surfdiff_core.store import ResultsStore


def show_progress() -> bool:
    """Progress bars on the terminal for `surfdiff run`; off in workers, where they would flood the logs."""
    return os.environ.get("SURFDIFF_PROGRESS") == "1"


def load(config_path: str) -> SurfdiffConfig:
    return load_config(config_path)


def flow_run_id() -> str | None:
    try:
        ctx = get_run_context()
    except Exception:  # noqa: BLE001 - outside a run (plain function call in tests)
        return None
    run = getattr(ctx, "flow_run", None) or getattr(getattr(ctx, "task_run", None), "flow_run_id", None)
    return str(getattr(run, "id", run)) if run else None


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def publish_results(
    cfg: SurfdiffConfig, store: ResultsStore, *, sources: list[str], title: str, store_path: str | None = None,
    criteria: dict | None = None, top: int = 3,
) -> dict:
    """Artifacts for the documents of `sources`: best-energy table, energy histogram, top/side views."""
    logger = get_run_logger()
    # Everything with an energy, including structures that relaxed out of the box (flagged in the documents).
    crit = {"source": {"$in": sources}, "valid": True, "energy": {"$ne": None},
            **(criteria or {})}
    docs = list(store.find(crit))
    if not docs:
        logger.info("no documents to report for %s", title)
        return {"n": 0}
    best = best_per_group(docs, k=top)
    rows = [{"system": s, "composition": c, "source": src, "rank": r + 1, "energy_eV": d.energy,
             "fmax": d.fmax, "doc_id": d.doc_id}
            for (s, c, src), ds in sorted(best.items()) for r, d in enumerate(ds)]
    create_table_artifact(key=artifact_key(f"{cfg.name}-{title}-best"), table=rows,
                          description=f"{title}: lowest energies per system, composition and source")
    figdir = data_root(cfg, store_path) / "figures"
    groups: dict[str, list[float]] = {}
    for d in docs:
        groups.setdefault(f"{d.source} {d.composition} {d.cell}", []).append(d.energy)
    hist = energy_histogram(groups, f"{cfg.name}: {title}", figdir / f"{artifact_key(title)}-energies.png")
    leaders = sorted((ds[0] for ds in best.values()), key=lambda d: d.energy)
    views = structure_views(leaders, figdir / f"{artifact_key(title)}-best.png")
    md = (f"# {title}\n\n{markdown_table(rows, list(rows[0]))}\n\n## Energy distribution\n\n"
          f"{png_markdown(hist, 'energies')}\n\n## Best structures (top and side views)\n\n"
          f"{png_markdown(views, 'structures')}\n")
    create_markdown_artifact(key=artifact_key(f"{cfg.name}-{title}-report"), markdown=md, description=title)
    logger.info("%s: %d structures; figures in %s", title, len(docs), figdir)
    return {"n": len(docs), "histogram": str(hist), "views": str(views), "best": rows}
