"""The pipeline's backbone: stages hand results on explicitly, and every selection is scoped to its study."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surfdiff_core.config import config_from_dict, load_config
from surfdiff_core.errors import SurfdiffError
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, name: str, compositions: str, store: Path, backend: str = "sqlite") -> Path:
    text = (TINY_CONFIG.replace("STORE", str(store)).replace("name: tiny", f"name: {name}")
            .replace("compositions: [Ag1O1, Ag2O1]", f"compositions: [{compositions}]")
            .replace("backend: sqlite", f"backend: {backend}"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _check_two_studies(cfg_a, cfg_b, result_a: dict, result_b: dict) -> None:
    """Each study's training data, candidates, relaxations and query defaults are its own."""
    from surfdiff_core.query import build_criteria, query_docs
    from surfdiff_core.stages.common import model_registry, open_study_store
    from surfdiff_core.train.checkpoint import load_checkpoint

    with open_study_store(cfg_a) as store:
        for cfg, result in ((cfg_a, result_a), (cfg_b, result_b)):
            mine = {d.doc_id for d in store.find({"study": cfg.name})}
            assert len(mine) == 8 + 4 + 1, cfg.name  # RSS, samples, one relaxation
            trained_on = load_checkpoint(result["model"]["checkpoint"]).meta["data"]["doc_ids"]
            assert set(trained_on) <= mine and trained_on
            generated = list(store.find({"study": cfg.name, "source": "generated"}))
            assert {d.model_id for d in generated} == {result["model"]["model_id"]}
            relaxed = list(store.find({"parent_id": {"$in": [d.doc_id for d in generated]}}))
            assert len(relaxed) == 1 and relaxed[0].study == cfg.name
            shown = query_docs(store, build_criteria(study=cfg.name))
            assert {d.doc_id for d in shown} == mine
        assert store.count({}) == 2 * (8 + 4 + 1)
    assert result_a["model"]["model_id"] != result_b["model"]["model_id"]
    with model_registry(cfg_a) as registry:
        assert [r.model_id for r in registry.find(study=cfg_b.name)] == [result_b["model"]["model_id"]]


@pytest.mark.slow
def test_two_studies_share_an_embedded_store_without_mixing(prefect_harness, tmp_path):
    from flows.discovery import discovery_flow

    store = tmp_path / "data" / "store"
    cfg_a = load_config(_study(tmp_path, "study-a", "Ag1O1, Ag2O1", store))
    cfg_b = load_config(_study(tmp_path, "study-b", "Ag1O1, Ag1O2", store))  # same system, same oracle
    result_a = discovery_flow(study=cfg_a, evaluate=False)
    result_b = discovery_flow(study=cfg_b, evaluate=False)
    _check_two_studies(cfg_a, cfg_b, result_a, result_b)


@pytest.mark.slow
def test_two_studies_share_a_mongo_store_without_mixing(prefect_harness, tmp_path, monkeypatch):
    import maggma.stores.mongolike as mongolike
    import mongomock_ng

    from flows.discovery import discovery_flow

    # The production backend (maggma MongoStore from SURFDIFF_MONGO_URI) over one in-process mongomock server,
    # which, unlike a real server, would forget everything when its client is closed.
    server = mongomock_ng.MongoClient()
    monkeypatch.setattr(server, "close", lambda: None)
    monkeypatch.setattr(mongolike, "MongoClient", lambda *a, **k: server)
    monkeypatch.setenv("SURFDIFF_MONGO_URI", "mongodb://surfdiff-test.invalid:27017")
    monkeypatch.chdir(tmp_path)  # a server store keeps checkpoints and figures under ./data
    store = tmp_path / "unused"
    cfg_a = load_config(_study(tmp_path, "study-a", "Ag1O1, Ag2O1", store, backend="mongo"))
    cfg_b = load_config(_study(tmp_path, "study-b", "Ag1O1, Ag1O2", store, backend="mongo"))
    result_a = discovery_flow(study=cfg_a, evaluate=False)
    result_b = discovery_flow(study=cfg_b, evaluate=False)
    _check_two_studies(cfg_a, cfg_b, result_a, result_b)


def _emt_and_other_model_docs(tmp_path):
    """One study's RSS with EMT, plus copies labelled as another energy model, 3 eV higher per O atom."""
    from surfdiff_core.stages import rss
    from surfdiff_core.stages.common import open_study_store

    cfg = load_config(_study(tmp_path, "mixed", "Ag1O1, Ag2O1", tmp_path / "store"))
    store = open_study_store(cfg).connect()
    rss.run(cfg, store, progress=False)
    emt = list(store.find({"source": "rss"}, with_frames=True))
    copies = []
    for d in emt:
        n_o = d.composition.count("O")  # one O per composition here
        shift = 3.0 * n_o
        frames = [f.model_copy(update={"energy": f.energy + shift}) for f in d.trajectory]
        copies.append(d.model_copy(update={
            "doc_id": d.doc_id.replace("rss-", "rss-other-"), "energy_model": "chgnet", "oracle": "chgnet",
            "energy": None if d.energy is None else d.energy + shift, "trajectory": frames}))
    store.put_many(copies)
    return cfg, store, {d.doc_id for d in emt}, {d.doc_id for d in copies}


def test_training_uses_only_the_studys_energy_model(tmp_path):
    from surfdiff_core.stages import train

    cfg, store, emt_ids, other_ids = _emt_and_other_model_docs(tmp_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    res = train.run(cfg, store, progress=False)
    assert res.energy_models == ["emt"]
    assert set(res.training_doc_ids) <= emt_ids and res.training_doc_ids
    # the same store, study and system with the other model as oracle trains on the other documents only
    other = cfg.model_copy(update={"oracle": cfg.oracle.model_copy(update={"name": "chgnet"})})
    res_other = train.run(other, store, progress=False)
    assert res_other.energy_models == ["chgnet"] and set(res_other.training_doc_ids) <= other_ids
    assert res_other.model_id != res.model_id
    store.close()


def test_mixing_energy_models_needs_a_rule_and_shifts_onto_one_scale(tmp_path):
    from surfdiff_core.stages.common import training_system
    from surfdiff_core.train.data import DataScope, load_samples

    with pytest.raises(SurfdiffError, match="train.combine"):
        config_from_dict({"train": {"energy_models": ["emt", "chgnet"]}})
    cfg, store, emt_ids, other_ids = _emt_and_other_model_docs(tmp_path)
    scope = DataScope(study="mixed", system_id=training_system(cfg).system_id, energy_models=("emt", "chgnet"))
    samples, ids = load_samples(store, scope, cfg.train.model_copy(update={"repeat": 1}))
    assert set(ids) == (emt_ids | other_ids) & set(ids) and set(ids) & other_ids and set(ids) & emt_ids
    by_id = {s.doc_id: s for s in samples}
    for i in set(ids) & other_ids:  # the other model's copy lands on the EMT energy of its original
        original = by_id.get(i.replace("rss-other-", "rss-"))
        if original is not None:
            assert by_id[i].energy == pytest.approx(original.energy, abs=1e-6)
    store.close()


def test_relaxations_of_one_candidate_stay_on_one_side_of_the_split():
    from surfdiff_core.train.data import Sample, repeat_sample
    from surfdiff_core.train.trainer import split_by_group

    def sample(doc_id: str, group: str) -> Sample:
        from ase.build import fcc111

        atoms = fcc111("Ag", size=(1, 1, 2), vacuum=5.0)
        z = np.zeros((len(atoms), 3))
        return Sample(atoms=atoms, movable=np.ones(len(atoms), bool), z_box=(0.0, 1.0), energy=0.0, forces=z,
                      frames=[(atoms.positions, 0.0, z)], doc_id=doc_id, composition="Ag1", group=group)

    samples = []
    for k in range(20):
        parent = f"generated-{k:03d}"
        samples += [sample(f"relaxed-{k:03d}", parent), sample(f"dft-{k:03d}", parent)]
        samples.append(repeat_sample(samples[-1], 2))
    samples += [sample(f"rss-x{k}", f"rss-x{k}") for k in range(10)]  # ids holding an "x" split no differently
    for seed in range(5):
        train_set, val_set = split_by_group(samples, 0.3, np.random.default_rng(seed))
        assert {s.group for s in train_set}.isdisjoint({s.group for s in val_set})
        assert len(train_set) + len(val_set) == len(samples)
        assert any(s.doc_id.startswith("relaxed") for s in val_set)
        assert any(s.doc_id.startswith("relaxed") for s in train_set)


def _import_graph(package: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        mod = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = deps
    return graph


def test_layout_has_no_import_loops_and_the_library_never_imports_prefect():
    graph = _import_graph(ROOT / "surfdiff_core")
    for mod, deps in graph.items():
        assert not any(d.split(".")[0] == "prefect" for d in deps), mod
        if mod.startswith("surfdiff_core.ml"):
            assert not any(d.startswith("surfdiff_core.diffusion") for d in deps), mod
        if mod.startswith("surfdiff_core.diffusion"):
            assert not any(d.startswith("surfdiff_core.ml") for d in deps), mod

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    # no loop between the library's packages (config -> system -> ... -> stages)
    edges = {(package(m), package(d)) for m, ds in graph.items() for d in ds
             if d.startswith("surfdiff_core.") and package(m) != package(d)}
    nodes = {a for a, _ in edges} | {b for _, b in edges}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for a, b in edges:
            if a == n:
                assert state.get(b) != 1, f"import loop: {' -> '.join([*path, b])}"
                if b not in state:
                    visit(b, [*path, b])
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            visit(n, [n])


def test_model_registry_refuses_a_replaced_checkpoint(tmp_path):
    from surfdiff_core.stages import sample, train
    from surfdiff_core.stages.common import open_study_store

    cfg = load_config(_study(tmp_path, "registry", "Ag1O1, Ag2O1", tmp_path / "store"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    with open_study_store(cfg) as store:
        from surfdiff_core.stages import rss

        rss.run(cfg, store, progress=False)
        res = train.run(cfg, store, progress=False)
    assert sample.resolve_model(cfg).model_id == res.model_id  # the registry, not file times
    with pytest.raises(SurfdiffError, match="no model 'model-nope'"):
        sample.resolve_model(cfg, model_id="model-nope")
    other = cfg.model_copy(update={"name": "someone-else"})
    with pytest.raises(SurfdiffError, match="no trained model for study 'someone-else'"):
        sample.resolve_model(other)
    Path(res.checkpoint).write_bytes(Path(res.checkpoint).read_bytes() + b"tampered")
    with pytest.raises(SurfdiffError, match="SHA-256 differs"):
        sample.resolve_model(cfg)


def _surfdiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_store_option_means_the_same_in_every_command(tmp_path):
    cfg = _study(tmp_path, "memory-study", "Ag1O1, Ag2O1", tmp_path / "unused", backend="memory")
    r = _surfdiff("rss", str(cfg), "--n", "2")
    assert r.returncode == 2 and "--store PATH" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    store = tmp_path / "embedded"
    assert _surfdiff("rss", str(cfg), "--n", "6", "--store", str(store)).returncode == 0
    q = _surfdiff("query", "--config", str(cfg), "--store", str(store), "--json")
    assert q.returncode == 0, q.stderr
    assert len(json.loads(q.stdout)) == 6
    r = _surfdiff("train", str(cfg), "--store", str(store), "--epochs", "1")  # finds what rss wrote
    assert r.returncode == 0, r.stderr
    assert "trained on study memory-study" in r.stdout


def test_replaced_option_says_what_replaced_it(tmp_path):
    cfg = _study(tmp_path, "opts", "Ag1O1", tmp_path / "store")
    r = _surfdiff("sample", str(cfg), "--checkpoint", "x.pt")
    assert r.returncode == 2 and "replaced by --model-id" in r.stderr and "Traceback" not in r.stderr


# Allowed directions between the top-level parts of the tree (docs/reference.md, "Layout"): the library stands alone,
# deploy/ (HPC, serving) builds on the library only, flows/ (Prefect, the CLI) on both; nothing points back.
ALLOWED_LAYERS = {"surfdiff_core": {"surfdiff_core"}, "deploy": {"surfdiff_core", "deploy"},
                  "flows": {"surfdiff_core", "deploy", "flows"}}


def _whole_tree_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for top in ALLOWED_LAYERS:
        for mod, deps in _import_graph(ROOT / top).items():
            graph[mod] = {d for d in deps if d.split(".")[0] in ALLOWED_LAYERS}
    return graph


def _resolve(graph: dict[str, set[str]], name: str) -> str | None:
    """The module of the tree an import names (`from a.b import c` may name module a.b.c or a.b)."""
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


def test_whole_tree_imports_follow_the_written_directions_without_cycles():
    graph = _whole_tree_graph()
    assert {m.split(".")[0] for m in graph} == set(ALLOWED_LAYERS)
    for mod, deps in graph.items():
        for d in deps:
            assert d.split(".")[0] in ALLOWED_LAYERS[mod.split(".")[0]], f"{mod} imports {d} against the layering"
    # cycles between modules' packages (a package's own modules may use each other), imports inside functions
    # included: a lazy import hides a loop from Python, not from a reader
    def package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "surfdiff_core" else parts[0]

    edges: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        for d in deps:
            target = _resolve(graph, d)
            if target and package(target) != package(mod):
                edges.setdefault(package(mod), set()).add(package(target))
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for b in sorted(edges.get(n, ())):
            assert state.get(b) != 1, f"import cycle: {' -> '.join([*path, b])}"
            if b not in state:
                visit(b, [*path, b])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])


def test_the_layering_check_finds_a_cycle_and_a_wrong_direction(monkeypatch):
    fake = {"flows.cli": {"deploy.slurm"}, "deploy.slurm": {"flows.cli"}}
    monkeypatch.setattr(sys.modules[__name__], "_whole_tree_graph", lambda: {**_REAL_GRAPH(), **fake})
    with pytest.raises(AssertionError, match="deploy.slurm imports flows.cli against the layering"):
        test_whole_tree_imports_follow_the_written_directions_without_cycles()
    fake = {"surfdiff_core.aa": {"surfdiff_core.bb"}, "surfdiff_core.bb": {"surfdiff_core.aa"}}
    monkeypatch.setattr(sys.modules[__name__], "_whole_tree_graph", lambda: {**_REAL_GRAPH(), **fake})
    with pytest.raises(AssertionError, match="import cycle"):
        test_whole_tree_imports_follow_the_written_directions_without_cycles()


_REAL_GRAPH = _whole_tree_graph
