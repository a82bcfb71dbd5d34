"""Results-store cost as a study grows: batched inserts, the top-10 query, count and distinct at 10³…10⁵.

    .venv/bin/python benchmarks/bench_store.py [--sizes 1000 10000 100000] [--backend sqlite] [--frames 10]

Documents are realistic: Ag12O6 on a 3-layer p(4×4) Ag(111) slab (66 atoms), forces, and `--frames`
relaxation frames, which go to the frames collection. They are spread over 10 systems × 4 sources × 25
compositions, so the query "system + source + composition, lowest 10 energies" matches 1/1000 of the store.
With SURFDIFF_MONGO_URI set and `--backend mongo`, the query plan (`explain()`) is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.store import StructureDoc, make_doc_id, open_store
from surfdiff_core.store.documents import SOURCES, atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import build_system

SYSTEMS = [f"Ag/fcc111/p(4x4)/3L/v{k}" for k in range(10)]
COMPOSITIONS = [f"Ag{12 + k % 5}O{6 + k // 5}" for k in range(25)]


def template(n_frames: int) -> StructureDoc:
    cfg = config_from_dict({"substrate": {"lattice_constant": 4.09}})
    system = build_system(cfg.substrate, cfg.confinement, "p(4x4)", "Ag12O6")
    rng = np.random.default_rng(0)
    atoms = system.random_structure(rng)
    forces = rng.normal(size=(len(atoms), 3))
    frames = [atoms.positions + 0.01 * k for k in range(n_frames)]
    return StructureDoc(
        doc_id="template", source="rss", structure=atoms_to_structure_dict(atoms), composition=system.composition,
        formula=atoms.get_chemical_formula(), system_id=system.system_id, element="Ag", facet="fcc111",
        cell=system.cell, n_substrate=system.n_substrate, movable=system.movable.tolist(),
        fixed=system.fixed_indices.tolist(), z_box=list(system.z_box), energy=-1.0,
        forces=np.round(forces, 6).tolist(), fmax=0.05, steps=120, oracle="emt",
        trajectory=frames_from_arrays(frames, [-1.0] * n_frames, [forces] * n_frames),
    )


def docs(base: StructureDoc, start: int, stop: int, rng: np.random.Generator) -> list[StructureDoc]:
    return [
        base.model_copy(update={
            "doc_id": make_doc_id("rss", "bench", k), "system_id": SYSTEMS[k % 10],
            "source": SOURCES[(k // 10) % 4], "composition": COMPOSITIONS[(k // 40) % 25],
            "energy": float(rng.normal(-300.0, 5.0)), "study": "bench", "energy_model": "emt",
        })
        for k in range(start, stop)
    ]


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def explain(store) -> None:
    coll = store.store._collection
    crit = {"system_id": SYSTEMS[1], "source": "rss", "composition": COMPOSITIONS[3]}
    plan = coll.find(crit).sort("energy", 1).limit(10).explain()
    winning = json.dumps(plan.get("queryPlanner", {}).get("winningPlan", plan), default=str)
    print("explain():", winning[:2000])
    sorts_in_memory = '"SORT"' in winning
    print(f"index-backed: {'IXSCAN' in winning}; in-memory sort: {sorts_in_memory}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--backend", default="sqlite", choices=["sqlite", "mongo", "monty", "memory"])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    if args.backend == "mongo" and not os.environ.get("SURFDIFF_MONGO_URI"):
        raise SystemExit("--backend mongo needs SURFDIFF_MONGO_URI (no MongoDB server on the development machine)")
    base = template(args.frames)
    lean = base.model_dump_json(exclude={"trajectory", "forces"})
    print(f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores; {args.backend}; document "
          f"{len(lean) / 1e3:.1f} kB queried + {(len(base.model_dump_json()) - len(lean)) / 1e3:.1f} kB frames")
    rng = np.random.default_rng(0)
    crit = {"system_id": SYSTEMS[1], "source": "rss", "composition": COMPOSITIONS[3]}
    rows = []
    with tempfile.TemporaryDirectory() as d, open_store(StoreConfig(backend=args.backend, database="bench",
                                                                    collection="bench"), path=d) as store:
        n = 0
        for size in sorted(args.sizes):
            t_insert, cpu_insert, written = 0.0, 0.0, 0
            while n < size:
                batch = docs(base, n, min(n + args.batch, size), rng)
                t, c = time.perf_counter(), time.process_time()
                store.put_many(batch)
                t_insert += time.perf_counter() - t
                cpu_insert += time.process_time() - c
                n += len(batch)
                written += len(batch)
            t_query, top = timed(lambda: list(store.find(crit, sort=[("energy", 1)], limit=10)))
            t_count, count = timed(lambda: store.count({"source": "rss", "system_id": SYSTEMS[2]}))
            t_distinct, comps = timed(lambda: store.distinct("composition"))
            top_ids = [x.doc_id for x in top]
            t_frames, frames = timed(lambda: store.load_frames(top_ids), repeat=3)  # noqa: B023 - called here
            hits = min(10, size // 1000)  # each (system, source, composition) holds 1 of every 1,000 documents
            assert len(top) == hits and [x.energy for x in top] == sorted(x.energy for x in top)
            assert len(comps) == 25 and len(frames) == hits and count == size // 40
            rows.append((size, written / t_insert, 1e3 * cpu_insert / written, t_query, t_count, t_distinct, t_frames))
            print(f"{size:>7,d} documents: insert {written / t_insert:,.0f}/s, top-10 query {1e3 * t_query:.1f} ms",
                  flush=True)
        if args.backend == "mongo":
            explain(store)
    print("\n| documents | batched insert docs/s | insert CPU ms/doc | top-10 query ms | count ms | distinct ms "
          "| frames of 10 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, rate, cpu, tq, tc, td, tf in rows:
        print(f"| {size:,} | {rate:,.0f} | {cpu:.2f} | {1e3 * tq:.2f} | {1e3 * tc:.2f} | {1e3 * td:.2f} "
              f"| {1e3 * tf:.2f} |")


if __name__ == "__main__":
    main()
