"""What every flow shares: the study (parsed once per run and handed on as a value), and artifacts."""

from __future__ import annotations

import os

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from surfdiff_core.config import SurfdiffConfig, config_from_dict, load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.query import best_per_group
from surfdiff_core.report import energy_histogram, markdown_table, png_markdown, structure_views
from surfdiff_core.stages.common import figure_dir, with_store_path
from surfdiff_core.store import ResultsStore


def show_progress() -> bool:
    """Progress bars on the terminal for `surfdiff run`; off in workers, where they would flood the logs."""
    return os.environ.get("SURFDIFF_PROGRESS") == "1"


def resolve_study(study: SurfdiffConfig | None, config_path: str | None,
                  store_path: str | None = None) -> SurfdiffConfig:
    """The study of a flow run: the typed form's value (the UI), or a config file (a path stays accepted).
    An explicit config_path wins: deployments carry a default study, and `-p config_path=...` must replace it.
    Parsed here once; every stage after this gets the value, so editing the YAML mid-run changes nothing."""
    if config_path:
        cfg = load_config(config_path)
    elif study is not None:
        cfg = study if isinstance(study, SurfdiffConfig) else config_from_dict(study, source="study")
    else:
        raise ConfigError("give the study (the typed form) or a config_path")
    return with_store_path(cfg, store_path)


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


def publish_results(cfg: SurfdiffConfig, store: ResultsStore, *, doc_ids: list[str], title: str,
                    top: int = 3) -> dict:
    """Artifacts for the documents a stage made: best-energy table, energy histogram, top/side views."""
    logger = get_run_logger()
    # Everything with an energy, including structures that relaxed out of the box (flagged in the documents).
    crit = {"doc_id": {"$in": list(doc_ids)}, "study": cfg.name, "valid": True, "energy": {"$ne": None}}
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
    figdir = figure_dir(cfg)
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
