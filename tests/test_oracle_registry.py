"""A new energy model is one registry entry: a trivial oracle (ASE's Morse pair potential) registered here runs
through the config, the RSS, the relax stage's jobflow path and the lattice cache without any other edit."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential
from maggma.stores import MemoryStore
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from flows.cli import main
from surfdiff_core.config import SurfdiffConfig, load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.oracles import OracleError, bulk_lattice_constant, get_calculator, supported_elements
from surfdiff_core.oracles.registry import (
    OracleSpec,
    available_oracles,
    register_oracle,
    registered_oracle,
    unregister_oracle,
)
from surfdiff_core.relax.ase_relax import relax_atoms
from surfdiff_core.stages import relax as relax_stage
from surfdiff_core.stages import rss as rss_stage
from surfdiff_core.stages.common import open_study_store


def _morse(s: dict) -> MorsePotential:
    return MorsePotential(epsilon=float(s["epsilon"]), r0=float(s["r0"]), rho0=float(s["rho0"]))


# The whole oracle: a name, what it is, the package it needs (and its pip extra), its settings with their
# defaults, the factory of its ASE calculator, and (optionally) the elements it can treat.
MORSE = OracleSpec(
    "morse", "Morse pair potential, one parameter set for every pair (a test oracle)", "ase", None,
    {"epsilon": 0.35, "r0": 2.87, "rho0": 6.0}, _morse, elements=frozenset({"Ag", "O"}),
)
SETTINGS = {"epsilon": 0.3}  # one setting given, the others defaulted


@pytest.fixture
def morse():
    with registered_oracle(MORSE) as spec:
        yield spec
    assert "morse" not in available_oracles()


def _morse_config(tiny_config, extra: str = "") -> SurfdiffConfig:
    text = tiny_config.read_text()
    text = text.replace("oracle: {name: emt}", "oracle: {name: morse, settings: {epsilon: 0.3}}")
    text = text.replace("relax: {method: emt,", "relax: {method: morse, settings: {epsilon: 0.3},")
    assert "emt" not in text
    tiny_config.write_text(text + extra)
    return load_config(tiny_config)


def _reference(s: dict | None = None) -> MorsePotential:
    return MorsePotential(**{**MORSE.defaults, **SETTINGS, **(s or {})})


def _atoms(structure: dict):
    atoms = AseAtomsAdaptor.get_atoms(Structure.from_dict(structure))
    atoms.pbc = [True, True, False]
    return atoms


def test_registered_oracle_runs_rss_and_the_relax_stage(tiny_config, morse):
    cfg = _morse_config(tiny_config)
    assert (cfg.oracle.name, cfg.relax.method) == ("morse", "morse")
    assert cfg.oracle.energy_model.startswith("morse:") and cfg.relax.energy_model == cfg.oracle.energy_model
    schema = SurfdiffConfig.model_json_schema()["$defs"]
    assert "morse" in schema["OracleConfig"]["properties"]["name"]["enum"]  # the UI's dropdown offers it
    assert "morse" in schema["RelaxConfig"]["properties"]["method"]["enum"]

    # RSS: documents of the new energy model, energies the calculator's own on the stored structures
    store = open_study_store(cfg)
    result = rss_stage.run(cfg, store, n=2, seed=3, progress=False)
    assert (result.done, result.failed) == (2, 0) and result.energy_model == cfg.oracle.energy_model
    docs = list(store.find({"doc_id": {"$in": result.doc_ids}}))
    assert len(docs) == 2
    for doc in docs:
        assert doc.oracle == "morse" and doc.energy_model == cfg.oracle.energy_model
        assert doc.oracle_settings == SETTINGS and doc.error is None and doc.steps > 0
        atoms = doc.to_atoms()
        atoms.calc = _reference()
        assert np.isfinite(doc.energy) and doc.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        atoms.calc = EMT()  # not the default oracle's energy under another name
        assert abs(atoms.get_potential_energy() - doc.energy) > 0.1
        initial = _atoms(doc.initial_structure)
        initial.calc = _reference()
        assert doc.energy < initial.get_potential_energy()  # relaxed downhill

    # The relax stage (atomate2's ASE job through jobflow) from the unrelaxed RSS placements
    candidates = [d.model_copy(update={"structure": d.initial_structure}) for d in docs]
    summary = relax_stage.run(cfg, store, candidates=candidates, run_id="r1", jobs_store=MemoryStore("jobs"))
    assert (summary.method, summary.relaxed, summary.failed) == ("morse", 2, 0)
    assert summary.energy_model == cfg.relax.energy_model
    relaxed = list(store.find({"doc_id": {"$in": summary.doc_ids}}))
    assert len(relaxed) == 2
    for doc in relaxed:
        parent = next(c for c in candidates if c.doc_id == doc.parent_id)
        assert doc.source == "relaxed" and doc.oracle == "morse" and doc.energy_model == cfg.relax.energy_model
        atoms = doc.to_atoms()
        atoms.calc = _reference()
        assert doc.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        # the same relaxation as in process: same optimiser and steps, fixed layers held
        ref = relax_atoms(_atoms(parent.structure), _reference(), fmax=cfg.relax.fmax, steps=cfg.relax.steps,
                          optimizer="BFGS", fixed=parent.fixed)
        assert doc.energy == pytest.approx(ref.energy, abs=1e-6) and doc.steps == ref.steps
        moved = np.linalg.norm(atoms.positions - _atoms(parent.structure).positions, axis=1)
        assert moved[parent.fixed].max() < 1e-8 and moved.max() > 0.01


def test_registered_oracle_settings_and_elements_are_checked_in_one_line(tiny_config, morse, capsys):
    assert get_calculator("morse", epsilon=0.3).parameters["epsilon"] == 0.3
    assert supported_elements("morse") == {"Ag", "O"}
    cases = [  # (oracle section, RSS compositions, the one line's fragment)
        ("{name: morse, settings: {sigma: 2.5}}", "[Ag1O1]",
         "unknown setting(s) 'sigma' for oracle 'morse'; valid: epsilon, r0, rho0"),
        ("{name: morse, settings: {trust_model_file: true}}", "[Ag1O1]", "unknown setting(s) 'trust_model_file'"),
        ("{name: morse}", "[Ag1Cu1]", "composition Ag1Cu1: oracle 'morse' cannot treat Cu; it supports Ag, O"),
    ]
    for i, (oracle, compositions, fragment) in enumerate(cases):
        path = tiny_config.parent / f"bad{i}.yaml"
        text = tiny_config.read_text().replace("oracle: {name: emt}", f"oracle: {oracle}")
        path.write_text(text.replace("compositions: [Ag1O1, Ag2O1]", f"compositions: {compositions}"))
        assert main(["rss", str(path), "--n", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tiny_config.parent / "data").exists()  # refused before the store was made
    with pytest.raises(OracleError, match=r"unknown setting\(s\) 'sigma' for oracle 'morse'"):
        get_calculator("morse", sigma=1.0)


def test_registry_refuses_duplicates_and_forgets_an_unregistered_oracle(tiny_config):
    register_oracle(MORSE)
    try:
        with pytest.raises(OracleError, match=r"^oracle 'morse' is already registered \(Morse pair potential"):
            register_oracle(MORSE)
        with pytest.raises(OracleError, match="^oracle 'emt' is already registered"):
            register_oracle(OracleSpec("emt", "another EMT", "ase", None, {}, _morse))
        with pytest.raises(OracleError, match="lowercase letters"):
            register_oracle(OracleSpec("Morse:2", "bad name", "ase", None, {}, _morse))
        with pytest.raises(OracleError, match="needs a factory"):
            register_oracle(OracleSpec("nofactory", "no calculator", "ase", None, {}))
        with pytest.raises(OracleError, match="built in"):
            unregister_oracle("emt")
        assert "morse" in available_oracles()
        _morse_config(tiny_config)  # valid while registered
    finally:
        assert unregister_oracle("morse") is MORSE
    assert available_oracles() == ["chgnet", "emt", "gpaw", "sevennet", "vasp"]
    with pytest.raises(ConfigError, match=r"oracle\.name: unknown oracle 'morse'; valid: chgnet, emt, gpaw, sevennet"):
        load_config(tiny_config)
    text = tiny_config.read_text().replace("oracle: {name: morse, settings: {epsilon: 0.3}}", "oracle: {name: emt}")
    tiny_config.write_text(text)
    with pytest.raises(ConfigError, match=r"^\S+: relax\.method: unknown relaxation method 'morse'; valid: chgnet"):
        load_config(tiny_config)
    with pytest.raises(OracleError, match="unknown oracle 'morse'"):
        get_calculator("morse")
    schema = SurfdiffConfig.model_json_schema()["$defs"]
    assert "morse" not in schema["OracleConfig"]["properties"]["name"]["enum"]
    with pytest.raises(OracleError, match="unknown relaxation method 'morse'"):
        from surfdiff_core.relax.jobflow_relax import make_relax_flow

        make_relax_flow([], "morse")


def test_registered_oracle_relaxes_the_bulk_lattice(tmp_path, morse):
    a = bulk_lattice_constant("Ag", "fcc", "morse", SETTINGS, cache_dir=tmp_path)["a"]
    # nearest neighbours at about r0 (the longer-range pairs pull them a little closer)
    assert 0.9 * np.sqrt(2) * MORSE.defaults["r0"] < a < 1.01 * np.sqrt(2) * MORSE.defaults["r0"]
    assert "/morse/" in (tmp_path / "lattice.json").read_text()
    assert bulk_lattice_constant("Ag", "fcc", "morse", SETTINGS, cache_dir=tmp_path)["a"] == a  # from the cache
