from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.geometry import get_distances

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.rss import run_rss
from surfdiff_core.store import open_store
from surfdiff_core.system import min_distance_matrix
from surfdiff_core.system_build import systems_for


def _cfg(**rss):
    return config_from_dict({
        "substrate": {"element": "Ag", "facet": "fcc111", "lattice_constant": 4.06, "layers": 3},
        "oracle": {"name": "emt"},
        "rss": {"cell": "c(2x8)", "compositions": ["Ag4O2", "Ag5O3"], "n": 4, "fmax": 0.2, "steps": 60,
                "trajectory_every": 5, **rss},
        "store": {"backend": "memory"},
    })


def _check_invariants(cfg, docs):
    systems = systems_for(cfg, cfg.rss.cell, cfg.rss.compositions, None)
    for d in docs:
        system = systems[d.composition]
        final = d.to_atoms()
        init = type(d).model_validate({**d.model_dump(), "structure": d.initial_structure}).to_atoms()
        n_sub = system.n_substrate
        # substrate: the template exactly at the start, fixed layers unchanged after relaxation
        np.testing.assert_allclose(init.positions[:n_sub], system.template.positions, atol=1e-6)
        fixed = system.fixed_indices
        np.testing.assert_allclose(final.positions[fixed], system.template.positions[fixed], atol=1e-6)
        # composition exact, every overlayer atom inside the box, minimum distances at placement
        assert list(final.symbols[n_sub:]) == list(system.overlayer)
        assert system.inside_box(init).all()
        assert d.in_box == bool(system.inside_box(final, tol=0.05).all())
        _, dist = get_distances(init.positions[n_sub:], init.positions, cell=init.cell, pbc=init.pbc)
        dmin = min_distance_matrix(init.get_chemical_symbols(), system.min_distance_scale)[n_sub:]
        for k in range(len(system.overlayer)):
            dist[k, n_sub + k] = np.inf
        assert np.all(dist >= dmin - 1e-6)
        # recorded quantities
        assert np.isfinite(d.energy) and d.steps >= 1 and d.wall_time > 0 and d.oracle == "emt"
        assert len(d.trajectory) >= 2
        assert d.trajectory[-1].energy == pytest.approx(d.energy, abs=1e-6)
        assert np.asarray(d.forces).shape == (len(final), 3)


def test_rss_invariants_and_resume():
    cfg = _cfg()
    with open_store(StoreConfig(backend="memory")) as store:
        report = run_rss(cfg, store, progress=False)
        assert (report.done, report.skipped, report.failed) == (4, 0, 0)
        docs = list(store.find({"source": "rss"}, with_frames=True))
        assert sorted(d.composition for d in docs) == ["Ag4O2", "Ag4O2", "Ag5O3", "Ag5O3"]
        _check_invariants(cfg, docs)
        # the same seed again: nothing redone, nothing duplicated; a larger n only adds the new ones
        again = run_rss(cfg, store, progress=False)
        assert (again.done, again.skipped) == (0, 4)
        more = run_rss(cfg, store, n=6, progress=False)
        assert (more.done, more.skipped) == (2, 4)
        assert store.count() == 6


def test_rss_is_reproducible_and_seeded():
    cfg = _cfg(n=2)
    energies = []
    for _ in range(2):
        with open_store(StoreConfig(backend="memory")) as store:
            run_rss(cfg, store, progress=False)
            energies.append(sorted(d.energy for d in store.find({})))
    assert energies[0] == pytest.approx(energies[1])
    with open_store(StoreConfig(backend="memory")) as store:
        run_rss(cfg, store, seed=99, progress=False)
        assert sorted(d.energy for d in store.find({})) != pytest.approx(energies[0])


def test_rss_on_another_facet_and_metal():
    cfg = config_from_dict({
        "substrate": {"element": "Cu", "facet": "fcc100", "lattice_constant": 3.6, "layers": 3},
        "rss": {"cell": "p(2x2)", "compositions": ["Cu1O2"], "n": 2, "fmax": 0.2, "steps": 60},
        "store": {"backend": "memory"},
    })
    with open_store(StoreConfig(backend="memory")) as store:
        report = run_rss(cfg, store, progress=False)
        assert report.done == 2
        _check_invariants(cfg, list(store.find({}, with_frames=True)))


def test_rss_process_pool_matches_serial(tmp_path):
    cfg = _cfg(n=4)
    with open_store(StoreConfig(backend="memory", collection="serial")) as serial, \
            open_store(StoreConfig(backend="memory", collection="pool")) as pool:
        run_rss(cfg, serial, progress=False)
        run_rss(cfg, pool, workers=2, progress=False)
        a = {d.doc_id: d.energy for d in serial.find({})}
        b = {d.doc_id: d.energy for d in pool.find({})}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-8)


CONFIG = """
substrate: {element: Ag, facet: fcc111, lattice_constant: 4.06, layers: 2, fixed_layers: 1}
rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 3, fmax: 0.2, steps: 40}
store: {backend: sqlite, path: STORE}
"""


def _surfdiff(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_rss_then_query(tmp_path):
    store = tmp_path / "store"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("STORE", str(store)))
    r = _surfdiff("rss", str(cfg), "--n", "3", cwd=".")
    assert r.returncode == 0, r.stderr
    assert "3 relaxed" in r.stdout
    q = _surfdiff("query", "--store", str(store), "--json", cwd=".")
    assert q.returncode == 0, q.stderr
    rows = json.loads(q.stdout)
    assert len(rows) == 3 and all(isinstance(r["energy"], float) for r in rows)
    top = json.loads(_surfdiff("query", "--store", str(store), "--json", "--top", "1", cwd=".").stdout)
    assert top[0]["energy"] == min(r["energy"] for r in rows)
    out = tmp_path / "best.extxyz"
    assert _surfdiff("query", "--store", str(store), "--export", str(out), cwd=".").returncode == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("yaml_text", "args", "fragment"),
    [
        ("substrate: {element: Qq}\n", [], "unknown element"),
        ("rss: {cell: [[1, 2], [2, 4]]}\n", [], "singular"),
        ("rss: {compositions: [Ag-1O2]}\n", [], "negative count"),
        ("substrate: {lattice_constant: 4.06}\nconfinement: {z_min: 0.5, z_max: 1.0}\n"
         "rss: {cell: p(1x1), compositions: [Ag9O9]}\n", [], "cannot fit"),
        ("substrate: {lattice_constant: 4.06, vacuum: 2}\n", [], "outside the cell"),
        ("rss: {cel: p(2x2)}\n", [], "unknown key"),
        ("substrate: {lattice_constant: 4.06}\n", ["--n", "-3"], "--n"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, yaml_text, args, fragment):
    store = tmp_path / "store"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text + f"store: {{backend: sqlite, path: {store}}}\n")
    r = _surfdiff("rss", str(cfg), *args, cwd=".")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not store.exists()


def test_cli_help_everywhere():
    for cmd in ([], ["rss"], ["query"], ["train"], ["sample"], ["run"], ["relax"], ["serve"]):
        r = _surfdiff(*cmd, "--help", cwd=".")
        assert r.returncode == 0 and "usage" in r.stdout


def test_query_without_store_is_a_clear_error(tmp_path):
    r = _surfdiff("query", "--store", str(tmp_path / "none"), cwd=".")
    assert r.returncode == 2 and "no results store" in r.stderr


@pytest.mark.slow
def test_cli_train_then_sample_into_a_larger_cell(tiny_config):
    cfg = str(tiny_config)
    assert _surfdiff("rss", cfg, cwd=".").returncode == 0
    r = _surfdiff("train", cfg, "--epochs", "2", cwd=".")
    assert r.returncode == 0, r.stderr
    assert "checkpoint:" in r.stdout
    r = _surfdiff("sample", cfg, "--cell", "p(4x4)", "--composition", "Ag4O2", "--n", "4", "--steps", "10",
                  "--no-guidance", "--json", cwd=".")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout[r.stdout.index("["):])[0]
    assert row["composition"] == "Ag4O2" and row["cell"] == "p(4x4)" and row["n"] == 4
    q = json.loads(_surfdiff("query", "--config", cfg, "--source", "generated", "--json", cwd=".").stdout)
    assert len(q) == 4 and all(d["model_id"].startswith("model-") for d in q)
    models = json.loads(_surfdiff("query", "--config", cfg, "--models", "--json", cwd=".").stdout)
    assert [m["model_id"] for m in models] == [q[0]["model_id"]] and models[0]["checkpoint"].endswith(".pt")
    ev = _surfdiff("evaluate", cfg, "--cell", "p(4x4)", "--composition", "Ag4O2", "--budget", "2", "--rss-budget",
                   "2", "--json", cwd=".")
    assert ev.returncode == 0, ev.stderr
    assert "vs RSS" in ev.stdout and "report:" in ev.stdout
    report = json.loads(ev.stdout[ev.stdout.index("{"):ev.stdout.rindex("}") + 1])
    assert [(t["composition"], t["cell"]) for t in report["targets"]] == [("Ag4O2", "p(4x4)")]
    assert all(len(t["rss_energies"]) == 2 and len(t["generative_energies"]) <= 2 for t in report["targets"])
    # sampled with other options than the config's: the evaluation judged that (newest) sample run, named
    assert report["targets"][0]["sample_runs"] == [q[0]["run_id"]]
    bad = _surfdiff("sample", cfg, "--cell", "p(4x4)", "--composition", "Pt3", "--n", "2", cwd=".")
    assert bad.returncode == 2 and "not trained on Pt" in bad.stderr and "Traceback" not in bad.stderr
    bad = _surfdiff("sample", cfg, "--cell", "p(4x4)", "--composition", "Ag4O2", "--steps", "0", cwd=".")
    assert bad.returncode == 2 and "--steps" in bad.stderr
