"""Query the results store: filters that map onto the document schema, shared by the CLI and the flows.

Every filter is parsed before the store is read: a filter that cannot match anything by construction (a cell
name that is no cell, a NaN energy) is one line naming it, never an empty answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from surfdiff_core.cells import FACETS, canonical_cell_name, cell_criteria, cell_label, cell_matrix
from surfdiff_core.composition import normalise_composition
from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import ConfigError
from surfdiff_core.store import ResultsStore, StructureDoc
from surfdiff_core.store.documents import SOURCES


def build_criteria(
    *,
    study: str | None = None,
    energy_model: str | None = None,
    model_id: str | None = None,
    system: str | None = None,
    composition: str | None = None,
    cell: str | None = None,
    source: str | None = None,
    max_energy: float | None = None,
    run_id: str | None = None,
    valid_only: bool = False,
) -> dict[str, Any]:
    crit: dict[str, Any] = {}
    if study:
        crit["study"] = study
    if energy_model:
        crit["energy_model"] = energy_model
    if model_id:
        crit["model_id"] = model_id
    if system:
        crit["system_id"] = system
    if composition:
        crit["composition"] = normalise_composition(composition)
    if cell:
        crit.update(cell_criteria(parse_cell_filter(cell)))  # a cell given by name or by matrix finds both
    if source:
        if source not in SOURCES:
            raise ConfigError(f"unknown source {source!r}: choose from {', '.join(SOURCES)}")
        crit["source"] = source
    if max_energy is not None:
        if not isinstance(max_energy, int | float) or not math.isfinite(max_energy):
            raise ConfigError(f"--max-energy {max_energy}: give a finite energy in eV")
        crit["energy"] = {"$lte": float(max_energy)}
    if run_id:
        crit["run_id"] = run_id
    if valid_only:
        crit["valid"] = True
        crit["in_box"] = True
    return crit


def parse_cell_filter(cell: str) -> str:
    """The stored label of a cell filter: a name defined on some facet ('p(4x4)', 'c(2x8)', 'sqrt3', Wood's
    notation) or a 2x2 integer matrix ('[[2,0],[-1,4]]'); anything else names no cell and is refused."""
    text = cell.strip()
    if text.startswith("["):
        try:
            matrix = json.loads(text)
        except ValueError:
            raise ConfigError(f"--cell {cell!r}: not a cell name or a 2x2 integer matrix") from None
        try:
            return cell_label(matrix, FACETS[0])
        except ConfigError as exc:
            raise ConfigError(f"--cell {cell!r}: {exc}") from None
    problems = []
    for facet in FACETS:
        try:
            cell_matrix(text, facet)
            return canonical_cell_name(text)
        except ConfigError as exc:
            problems.append(str(exc))
    raise ConfigError(f"--cell {cell!r}: {problems[0]}")


def require_existing_store(store: StoreConfig) -> None:
    """A query reads: it never creates a store. One line when the configured embedded store does not exist."""
    from surfdiff_core.store.backends import sqlite_file

    if store.backend == "sqlite":
        where = sqlite_file(store, None)
    elif store.backend in ("monty", "json"):
        where = Path(store.path).expanduser()
    else:
        return  # a server or in-memory store: nothing on disk to look for
    if not where.exists():
        raise ConfigError(f"no results store at {where} (run `surfdiff rss CONFIG` first, or give --store PATH)")


def query_docs(store: ResultsStore, criteria: dict[str, Any], *, top: int | None = None) -> list[StructureDoc]:
    """Documents matching `criteria`, lowest energy first when `top` is given (documents without energy last)."""
    if top is not None and top <= 0:
        raise ConfigError("--top must be a positive number")
    docs = list(store.find(criteria))
    docs.sort(key=lambda d: (d.energy is None, d.energy if d.energy is not None else 0.0, d.doc_id))
    return docs[:top] if top else docs


def best_per_group(docs: list[StructureDoc], k: int = 1) -> dict[tuple[str, str, str], list[StructureDoc]]:
    """Lowest-energy k documents per (system, composition, source)."""
    groups: dict[tuple[str, str, str], list[StructureDoc]] = {}
    for d in sorted((d for d in docs if d.energy is not None), key=lambda d: d.energy):
        key = (d.system_id, d.composition, d.source)
        if len(groups.setdefault(key, [])) < k:
            groups[key].append(d)
    return groups


def lineage(store: ResultsStore, doc_id: str) -> list[StructureDoc]:
    """The provenance chain ending at `doc_id`: e.g. generated -> relaxed -> dft (oldest first)."""
    chain: list[StructureDoc] = []
    seen: set[str] = set()
    current: str | None = doc_id
    while current and current not in seen:
        seen.add(current)
        doc = store.get(current)
        if doc is None:
            if not chain:
                raise ConfigError(f"no document with id {doc_id!r}")
            break
        chain.append(doc)
        current = doc.parent_id
    return chain[::-1]


def descendants(store: ResultsStore, doc_id: str) -> list[StructureDoc]:
    """Documents derived from `doc_id` (relaxations of a generated structure, ...), breadth first."""
    out: list[StructureDoc] = []
    frontier = [doc_id]
    while frontier:
        children = list(store.find({"parent_id": {"$in": frontier}}))
        out.extend(children)
        frontier = [c.doc_id for c in children]
    return out


def print_table(docs: list[StructureDoc], scope: str = "") -> None:
    if not docs:
        print(f"no matching structures ({scope})" if scope else "no matching structures")
        return
    head = (f"{'doc_id':30} {'source':9} {'study':12} {'system':28} {'composition':11} {'energy/eV':>11} "
            f"{'fmax':>6} {'steps':>5}")
    print(head)
    for d in docs:
        e = f"{d.energy:11.4f}" if d.energy is not None else f"{'-':>11}"
        f = f"{d.fmax:6.3f}" if d.fmax is not None else f"{'-':>6}"
        s = f"{d.steps:5d}" if d.steps is not None else f"{'-':>5}"
        flag = "" if d.valid and d.in_box else ("  (error)" if d.error else "  (out of box)")
        print(f"{d.doc_id:30} {d.source:9} {str(d.study)[:12]:12} {d.system_id:28} {d.composition:11} {e} {f} "
              f"{s}{flag}")
    print(f"{len(docs)} structures" + (f" ({scope})" if scope else ""))
