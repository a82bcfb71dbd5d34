from __future__ import annotations

import numpy as np
import pytest
from ase.io import read

from surfdiff_core.config import StoreConfig, config_from_dict
from surfdiff_core.export import export_docs
from surfdiff_core.query import build_criteria, query_docs
from surfdiff_core.store import StructureDoc, make_doc_id, open_store
from surfdiff_core.store.documents import atoms_to_structure_dict, frames_from_arrays
from surfdiff_core.system import build_system


def _doc(i: int, energy: float | None = -1.0, source: str = "rss", cell: str | list = "p(2x2)",
         facet: str = "fcc111") -> StructureDoc:
    cfg = config_from_dict({"substrate": {"lattice_constant": 4.09, "facet": facet}, "rss": {"cell": "p(2x2)"}})
    system = build_system(cfg.substrate, cfg.confinement, cell, "Ag1O1")
    atoms = system.random_structure(np.random.default_rng(i))
    forces = np.random.default_rng(i).normal(size=(len(atoms), 3))
    return StructureDoc(
        doc_id=make_doc_id(source, "test", i), source=source, structure=atoms_to_structure_dict(atoms),
        composition=system.composition, formula=atoms.get_chemical_formula(), system_id=system.system_id,
        element="Ag", facet=facet, cell=system.cell, n_substrate=system.n_substrate,
        movable=system.movable.tolist(), fixed=system.fixed_indices.tolist(), z_box=list(system.z_box),
        energy=energy, forces=forces.tolist(), fmax=float(np.linalg.norm(forces, axis=1).max()), steps=3,
        oracle="emt", seed=i,
        trajectory=frames_from_arrays([atoms.positions], [energy or 0.0], [forces]),
    )


@pytest.fixture(params=["sqlite", "memory", "monty", "json"])
def store(request, tmp_path):
    path = tmp_path / ("store.json" if request.param == "json" else "store")
    s = open_store(StoreConfig(backend=request.param), path=path)
    with s:
        yield s


def test_round_trip(store):
    docs = [_doc(i, energy=-float(i)) for i in range(4)]
    store.put_many(docs)
    assert store.count() == 4
    back = store.get(docs[2].doc_id)
    assert back is not None
    assert back.model_dump(exclude={"created_at", "updated_at"}) == docs[2].model_dump(
        exclude={"created_at", "updated_at"}
    )
    atoms = back.to_atoms()
    np.testing.assert_allclose(atoms.positions, docs[2].to_atoms().positions)
    assert atoms.get_array("movable").sum() == 2


def test_retried_writes_do_not_duplicate(store):
    d = _doc(1)
    store.put(d)
    created = store.get(d.doc_id).created_at
    store.put(d.model_copy(update={"energy": -5.0}))
    assert store.count() == 1
    again = store.get(d.doc_id)
    assert again.energy == -5.0
    assert again.created_at == created


def test_query_filters_and_top(store):
    store.put_many([_doc(i, energy=-float(i)) for i in range(5)] + [_doc(9, source="generated", energy=None)])
    top = query_docs(store, build_criteria(source="rss"), top=2)
    assert [d.energy for d in top] == [-4.0, -3.0]
    assert len(query_docs(store, build_criteria(max_energy=-2.5))) == 2
    assert len(query_docs(store, build_criteria(source="generated"))) == 1
    assert len(query_docs(store, build_criteria(composition="Ag1O1", cell="p(2×2)"))) == 6


def test_cell_filter_finds_a_cell_by_name_and_by_matrix(store):
    store.put_many([_doc(1), _doc(2, cell=[[2, 0], [0, 2]]), _doc(3, cell="p(3x3)"), _doc(4, cell=[[2, 0], [1, 2]])])
    assert {d.cell for d in query_docs(store, build_criteria(cell="[[2, 0], [0, 2]]"))} == {"p(2x2)", "[[2,0],[0,2]]"}
    for same in ("p(2x2)", "2x2", "[[2,0],[0,2]]"):
        assert len(query_docs(store, build_criteria(cell=same))) == 2
    assert [d.seed for d in query_docs(store, build_criteria(cell="[[2,0],[1,2]]"))] == [4]
    assert [d.seed for d in query_docs(store, build_criteria(cell="p(3x3)"))] == [3]


def test_cell_filter_keeps_to_the_facet_where_a_name_and_a_matrix_are_the_same_cell(store):
    """[[1,1],[-1,1]] is c(2x2) on fcc100 but another cell on fcc111: by name only fcc100's documents."""
    store.put_many([_doc(1, cell="c(2x2)", facet="fcc100"), _doc(2, cell=[[1, 1], [-1, 1]], facet="fcc100"),
                    _doc(3, cell=[[1, 1], [-1, 1]]), _doc(4, cell="p(2x2)", facet="fcc100"), _doc(5)])
    assert {d.seed for d in query_docs(store, build_criteria(cell="c(2x2)"))} == {1, 2}
    assert {d.seed for d in query_docs(store, build_criteria(cell="[[1,1],[-1,1]]"))} == {1, 2, 3}
    assert {d.seed for d in query_docs(store, build_criteria(cell="p(2x2)"))} == {4, 5}  # the same on every facet


def test_monty_store_persists_across_connections(tmp_path):
    cfg = StoreConfig(backend="monty")
    with open_store(cfg, path=tmp_path / "s") as s:
        s.put(_doc(3))
    with open_store(cfg, path=tmp_path / "s") as s:
        assert s.count() == 1
        assert s.existing_ids([_doc(3).doc_id, "nope"]) == {_doc(3).doc_id}


def test_mongo_uri_comes_from_the_environment(monkeypatch):
    from surfdiff_core.errors import ConfigError

    monkeypatch.delenv("SURFDIFF_MONGO_URI", raising=False)
    with pytest.raises(ConfigError, match="SURFDIFF_MONGO_URI"):
        open_store(StoreConfig(backend="mongo"))


def test_export_extxyz_and_cif(tmp_path):
    docs = [_doc(i, energy=-float(i)) for i in range(3)]
    out = export_docs(docs, tmp_path / "x.extxyz")
    images = read(out, index=":")
    assert len(images) == 3
    energy = images[1].info.get("energy", None)
    if energy is None:  # newer ASE moves 'energy' into a single-point calculator on read
        energy = images[1].get_potential_energy()
    assert energy == pytest.approx(-1.0)
    assert images[1].info["composition"] == "Ag1O1"
    np.testing.assert_allclose(images[2].positions, docs[2].to_atoms().positions, atol=1e-5)
    cif = export_docs(docs, tmp_path / "x.cif")
    assert len(read(cif, index=":")) == 3


def test_existing_ids_for_many_ids(store):
    docs = [_doc(i) for i in range(3)]
    store.put_many(docs)
    asked = [f"rss-missing-{k}" for k in range(600)] + [d.doc_id for d in docs[:2]]
    assert store.existing_ids(asked) == {docs[0].doc_id, docs[1].doc_id}
    assert store.existing_ids(asked[-2:]) == {docs[0].doc_id, docs[1].doc_id}


def test_monty_direct_inserts_never_duplicate_across_connections(tmp_path):
    """Two connections (e.g. two processes) write the same new document: one insert, then a replace."""
    cfg = StoreConfig(backend="monty")
    a = open_store(cfg, path=tmp_path / "s").connect()
    b = open_store(cfg, path=tmp_path / "s").connect()  # its view of existing ids is now stale
    d = _doc(5)
    a.put(d)
    b.put(d.model_copy(update={"energy": -9.0}))
    b.put(_doc(6))
    with open_store(cfg, path=tmp_path / "s") as c:
        assert c.count() == 2
        assert c.get(d.doc_id).energy == -9.0
    a.close()
    b.close()


# ---- issue 10: SQLite default, frames out of the documents, MongoStore (mongomock), migration ---------------


@pytest.fixture
def mongomock_store():
    import mongomock_ng as mongomock
    from maggma.stores import MongoStore

    from surfdiff_core.store import ResultsStore

    db = mongomock.MongoClient().surfdiff
    s = ResultsStore(MongoStore.from_collection(db.structures), frames=MongoStore.from_collection(db.structures_frames))
    with s:
        yield s


def test_sqlite_is_the_default_backend():
    assert StoreConfig().backend == "sqlite"


def test_mongomock_round_trip_with_frames(mongomock_store):
    docs = [_doc(i, energy=-float(i)) for i in range(4)]
    mongomock_store.put_many(docs)
    assert mongomock_store.count() == 4
    back = mongomock_store.get(docs[1].doc_id)
    assert back.model_dump(exclude={"created_at", "updated_at"}) == docs[1].model_dump(
        exclude={"created_at", "updated_at"})
    lean = next(mongomock_store.find({"doc_id": docs[1].doc_id}))
    assert lean.trajectory == [] and lean.forces is None
    assert "trajectory" not in mongomock_store.store.query_one({"doc_id": docs[1].doc_id})
    info = mongomock_store.store._collection.index_information()
    indexed = {k for spec in info.values() for k, _ in spec["key"]}
    assert {"doc_id", "system_id", "composition", "energy", "study", "energy_model"} <= indexed
    # the study's main query (system, source, composition equal; energy sorted) is one compound index: equality
    # fields first, then the sort field, so MongoDB answers it by an index scan with no in-memory sort
    compound = [[k for k, _ in spec["key"]] for spec in info.values() if len(spec["key"]) > 1]
    assert ["system_id", "source", "composition", "energy"] in compound


def test_frames_round_trip_and_find_options(store):
    docs = [_doc(i, energy=-float(i)) for i in range(5)]
    store.put_many(docs)
    lean = list(store.find({"source": "rss"}, sort=[("energy", 1)], limit=2))
    assert [d.energy for d in lean] == [-4.0, -3.0]
    assert all(d.trajectory == [] for d in lean)
    full = {d.doc_id: d for d in store.find({}, with_frames=True)}
    for d in docs:
        assert full[d.doc_id].trajectory == d.trajectory
        assert full[d.doc_id].forces == d.forces
    frames = store.load_frames([docs[0].doc_id, "rss-missing"])
    assert list(frames) == [docs[0].doc_id] and frames[docs[0].doc_id] == docs[0].trajectory


def test_sqlite_query_uses_the_indexes(tmp_path):
    with open_store(StoreConfig(), path=tmp_path / "s") as s:
        s.put_many([_doc(i, energy=-float(i)) for i in range(3)])
        conn = s.store._collection
        crit = {"system_id": "x", "source": "rss", "composition": "Ag1O1"}
        from surfdiff_core.store.sqlite_query import order_by, translate

        where = translate(crit, s.store._census())
        plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT doc FROM structures WHERE {where.sql}"
                            f"{order_by({'energy': 1})} LIMIT 10", where.params).fetchall()
        text = " ".join(str(r) for r in plan)
        assert "USING INDEX" in text and "TEMP B-TREE" not in text
        assert (tmp_path / "s" / "surfdiff.sqlite3").is_file()


def test_unreachable_mongo_fails_fast_in_one_line_without_password(monkeypatch):
    import time

    from surfdiff_core.errors import SurfdiffError

    user, password = "alice", "s3cr3t-pw"  # assembled here: no credentialed URI literal in the tree
    uri = "mongodb://" + user + ":" + password + "@127.0.0.1:9/surfdiff?authSource=admin"
    monkeypatch.setenv("SURFDIFF_MONGO_URI", uri)
    t = time.perf_counter()
    with pytest.raises(SurfdiffError) as err:
        open_store(StoreConfig(backend="mongo", server_timeout_s=0.5)).connect()
    assert time.perf_counter() - t < 5
    msg = str(err.value)
    assert "\n" not in msg and "127.0.0.1:9" in msg
    assert "s3cr3t" not in msg and "alice" not in msg


def _old_monty_store(path, docs):
    """A MontyStore as earlier versions wrote it: frames inside the documents, no frames collection."""
    from maggma.stores import MontyStore

    old = MontyStore(collection_name="structures", database_path=str(path), database_name="surfdiff",
                     storage="sqlite", key="doc_id")
    old.connect()
    old.update([d.model_dump(mode="json") for d in docs], key="doc_id")
    models = MontyStore(collection_name="structures_models", database_path=str(path), database_name="surfdiff",
                        storage="sqlite", key="model_id")
    models.connect()
    models.update([{"model_id": "m1", "system_id": "s"}], key="model_id")
    old.close()
    models.close()


def test_old_monty_store_is_refused_then_migrated(tmp_path):
    from surfdiff_core.errors import SurfdiffError
    from surfdiff_core.store.migrate import migrate_store

    docs = [_doc(i, energy=-float(i)) for i in range(3)]
    _old_monty_store(tmp_path / "old", docs)
    with pytest.raises(SurfdiffError, match=f"surfdiff store migrate {tmp_path / 'old'}") as err:
        open_store(StoreConfig(), path=tmp_path / "old").connect()
    assert "\n" not in str(err.value)
    assert migrate_store(tmp_path / "old", StoreConfig()) == 3 + 1
    assert migrate_store(tmp_path / "old", StoreConfig()) == 1  # idempotent: structures skipped
    with open_store(StoreConfig(), path=tmp_path / "old") as s:
        assert s.count() == 3
        assert "trajectory" not in s.store.query_one({"doc_id": docs[0].doc_id})
        back = s.get(docs[0].doc_id)
        assert back.trajectory == docs[0].trajectory and back.created_at == docs[0].created_at
    from surfdiff_core.store.models import ModelRegistry

    with ModelRegistry(StoreConfig(), tmp_path / "old") as reg:
        assert reg._store.count() == 1
