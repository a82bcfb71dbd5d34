"""Embedded store (MontyStore, sqlite) write and query cost as the collection grows.

    .venv/bin/python benchmarks/bench_store.py [--n 400]

Documents are RSS-sized (c(2×8) Ag(111) + Ag6O3, forces and 30 relaxation frames, ~30 kB each).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.store import StructureDoc, make_doc_id, open_store
from surfdiff_core.store.documents import atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import build_system


def rss_like_doc(k: int, system, atoms) -> StructureDoc:
    f = np.zeros((len(atoms), 3))
    return StructureDoc(
        doc_id=make_doc_id("rss", "bench", k), source="rss", structure=atoms_to_structure_dict(atoms),
        composition=system.composition, formula=atoms.get_chemical_formula(), system_id=system.system_id,
        element="Ag", facet="fcc111", cell=system.cell, n_substrate=system.n_substrate,
        movable=system.movable.tolist(), z_box=list(system.z_box), energy=-float(k), forces=f.tolist(),
        trajectory=frames_from_arrays([atoms.positions] * 30, [0.0] * 30, [f] * 30),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=400)
    args = p.parse_args()
    cfg = config_from_dict({"substrate": {"lattice_constant": 4.09}})
    system = build_system(cfg.substrate, cfg.confinement, "c(2x8)", "Ag6O3")
    atoms = system.random_structure(np.random.default_rng(0))
    print(f"machine: {platform.machine()} {platform.system()}; {len(rss_like_doc(0, system, atoms).model_dump_json())} "
          "bytes per document")
    with tempfile.TemporaryDirectory() as d, open_store(StoreConfig(backend="monty"), path=d) as store:
        t = time.perf_counter()
        for k in range(args.n):
            store.put(rss_like_doc(k, system, atoms))
            if (k + 1) % 100 == 0:
                print(f"{k + 1:6d} documents: {1000 * (time.perf_counter() - t) / 100:7.1f} ms per new document")
                t = time.perf_counter()
        t = time.perf_counter()
        store.put(rss_like_doc(0, system, atoms))
        print(f"replace an existing document: {1000 * (time.perf_counter() - t):7.1f} ms")
        t = time.perf_counter()
        top = list(store.find({"energy": {"$lte": -args.n + 10}}))
        print(f"query (energy filter, {len(top)} hits): {1000 * (time.perf_counter() - t):7.1f} ms")


if __name__ == "__main__":
    main()
