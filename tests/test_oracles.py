from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from surfdiff_core.oracles import (
    MissingExtraError,
    OracleError,
    available_oracles,
    bulk_lattice_constant,
    get_calculator,
    kpts_from_cell,
    oracle_settings_hash,
    resolve_settings,
)
from surfdiff_core.oracles import lattice as lattice_mod
from surfdiff_core.relax.ase_relax import RelaxError, relax_atoms


def _slab() -> tuple[Atoms, list[int]]:
    slab = fcc111("Ag", size=(2, 2, 3), a=4.0636, vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "ontop")
    fixed = [a.index for a in slab if a.tag == 3]  # bottom layer
    return slab, fixed


# ---- registry -----------------------------------------------------------------------------------------
def test_registry_names_and_unknown_oracle():
    assert available_oracles() == ["chgnet", "emt", "gpaw", "sevennet", "vasp"]
    assert "emt" in available_oracles(installed_only=True)
    with pytest.raises(OracleError, match=r"unknown oracle 'nope'; valid oracles: chgnet, emt, gpaw, sevennet, vasp"):
        get_calculator("nope")


def test_unknown_setting_is_an_error():
    with pytest.raises(OracleError, match=r"unknown setting\(s\) 'ecutt' for oracle 'gpaw'"):
        get_calculator("gpaw", ecutt=300)
    with pytest.raises(OracleError, match="unknown setting"):
        oracle_settings_hash("emt", {"cutoff": 1.0})


def test_missing_extra_gives_one_line_with_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "chgnet", None)  # makes `import chgnet` raise ImportError
    with pytest.raises(MissingExtraError) as info:
        get_calculator("chgnet")
    msg = str(info.value)
    assert msg == "oracle 'chgnet' needs the optional dependency chgnet: pip install 'surfdiff[chgnet]'"
    assert "\n" not in msg
    assert isinstance(info.value, OracleError) and isinstance(info.value, ValueError)


def test_vasp_is_not_an_in_process_calculator():
    with pytest.raises(OracleError, match="jobflow route.*make_relax_flow"):
        get_calculator("vasp")
    assert resolve_settings("vasp")["incar"] == {}


def test_settings_hash_is_stable():
    h = oracle_settings_hash("gpaw", {})
    assert len(h) == 16
    assert oracle_settings_hash("gpaw", {"ecut": 350}) == h  # explicit default, int vs float
    assert oracle_settings_hash("gpaw", {"xc": "PBE", "ecut": 350.0}) == oracle_settings_hash(
        "gpaw", {"ecut": 350.0, "xc": "PBE"}
    )
    assert oracle_settings_hash("gpaw", {"kpts": (4, 4, 1)}) == oracle_settings_hash("gpaw", {"kpts": [4, 4, 1]})
    assert oracle_settings_hash("gpaw", {"ecut": 400}) != h
    assert oracle_settings_hash("emt", {}) != oracle_settings_hash("chgnet", {})
    # Same value in a fresh interpreter (no dependence on hash randomisation or import order).
    code = "from surfdiff_core.oracles import oracle_settings_hash as f; print(f('gpaw', {'ecut': 350}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == h


def test_kpts_from_cell_gives_one_kpoint_along_the_normal():
    slab, _ = _slab()
    kpts = kpts_from_cell(slab.cell, 3.0)
    assert kpts[2] == 1 and kpts[0] == kpts[1] >= 3


def test_emt_calculator():
    slab, _ = _slab()
    slab.calc = get_calculator("emt")
    assert isinstance(slab.calc, EMT)
    assert np.isfinite(slab.get_potential_energy())


# ---- bulk lattice constant ----------------------------------------------------------------------------------
def test_emt_lattice_constant_is_cached(tmp_path, monkeypatch):
    res = bulk_lattice_constant("Ag", "fcc", "emt", cache_dir=tmp_path)
    assert set(res) == {"a"}
    assert 4.06 <= res["a"] <= 4.10
    data = json.loads((tmp_path / "lattice.json").read_text())
    assert len(data) == 1
    (entry,) = data.values()
    assert entry["a"] == res["a"] and entry["settings_hash"] == oracle_settings_hash("emt", {})

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(lattice_mod, "_compute_lattice", boom)
    assert bulk_lattice_constant("Ag", "fcc", "emt", cache_dir=tmp_path) == res
    assert bulk_lattice_constant("Ag", "fcc", "emt", {"asap_cutoff": False}, cache_dir=tmp_path) == res
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: another key
        bulk_lattice_constant("Ag", "fcc", "emt", {"asap_cutoff": True}, cache_dir=tmp_path)
    assert not list(tmp_path.glob(".lattice-*"))  # no temporary files left behind


def test_lattice_cache_dir_from_environment(lattice_cache):
    res = bulk_lattice_constant("Cu", "hcp", "emt")
    assert (lattice_cache / "lattice.json").exists()
    assert set(res) == {"a", "c"}
    assert 2.4 < res["a"] < 2.7 and 1.5 < res["c"] / res["a"] < 1.75


def test_lattice_constant_bad_input(tmp_path):
    with pytest.raises(OracleError, match="crystal"):
        bulk_lattice_constant("Ag", "bcc", "emt", cache_dir=tmp_path)
    with pytest.raises(OracleError, match="unknown oracle"):
        bulk_lattice_constant("Ag", "fcc", "nope", cache_dir=tmp_path)


# ---- relax_atoms ------------------------------------------------------------------------------------------
def test_relax_atoms_emt_slab():
    slab, fixed = _slab()
    slab.calc = EMT()
    e0 = slab.get_potential_energy()
    res = relax_atoms(slab, EMT(), fmax=0.05, steps=200, trajectory_every=5, fixed=fixed)
    assert res.converged and res.fmax <= 0.05 and res.steps > 0
    assert res.energy < e0
    assert np.allclose(res.atoms.positions[fixed], slab.positions[fixed])
    assert not np.allclose(res.atoms.positions[-1], slab.positions[-1])  # the adatom did move
    assert res.atoms.calc is None and slab.calc is not None  # input untouched, result detached
    assert res.forces.shape == (len(slab), 3)
    # frames at steps 0, 5, 10, ... plus the final one
    assert len(res.trajectory) == res.steps // 5 + 1 + (res.steps % 5 != 0)
    assert res.trajectory[0]["energy"] == pytest.approx(e0)
    assert res.trajectory[-1]["energy"] == pytest.approx(res.energy)
    assert np.allclose(res.trajectory[-1]["positions"], res.atoms.positions)
    assert all(f["forces"].shape == (len(slab), 3) for f in res.trajectory)
    movable = np.setdiff1d(np.arange(len(slab)), fixed)
    assert res.fmax == pytest.approx(np.linalg.norm(res.forces[movable], axis=1).max())


class _Exploding(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise RuntimeError("SCF did not converge")


def test_relax_atoms_reports_calculator_errors():
    slab, fixed = _slab()
    with pytest.raises(RelaxError, match="SCF did not converge"):
        relax_atoms(slab, _Exploding(), fixed=fixed)
    with pytest.raises(ValueError, match="optimizer"):
        relax_atoms(slab, EMT(), optimizer="CG")  # type: ignore[arg-type]


# ---- optional oracles ---------------------------------------------------------------------------------------
@pytest.mark.chgnet
def test_chgnet_energy_on_a_small_slab(capsys):
    pytest.importorskip("chgnet", reason="chgnet extra not installed")
    slab, _ = _slab()
    slab.calc = get_calculator("chgnet")
    assert capsys.readouterr().out == ""  # no 'initialized with' / 'will run on' line per load
    e = slab.get_potential_energy()
    f = slab.get_forces()
    assert np.isfinite(e) and -5.0 < e / len(slab) < -1.0
    assert f.shape == (len(slab), 3) and np.all(np.isfinite(f))


@pytest.mark.chgnet
def test_chgnet_computes_what_is_asked_and_the_same_numbers():
    """Energy and forces alone (no stress derivative) in a relaxation; the stress and moments on request, all
    equal to CHGNet's own calculator, which computes everything on every call."""
    pytest.importorskip("chgnet", reason="chgnet extra not installed")
    from chgnet.model.dynamics import CHGNetCalculator

    from surfdiff_core.oracles.calculators import chgnet_task

    assert [chgnet_task(p) for p in (["energy"], ["forces"], ["stress"], ["magmoms"], None)] == [
        "ef", "ef", "efs", "efsm", "ef"]
    slab, _ = _slab()
    asked = get_calculator("chgnet")
    stock = CHGNetCalculator(model=asked.model, use_device="cpu")
    a, b = slab.copy(), slab.copy()
    a.calc, b.calc = asked, stock
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-5)
    assert np.allclose(a.get_forces(), b.get_forces(), atol=1e-5)
    assert "stress" not in asked.results and "stress" in stock.results
    assert np.allclose(a.get_stress(apply_constraint=False), b.get_stress(apply_constraint=False), atol=1e-6)
    assert np.allclose(asked.get_property("magmoms", a), stock.results["magmoms"], atol=1e-6)


@pytest.mark.slow
def test_sevennet_energy_on_a_small_slab():
    pytest.importorskip("sevenn", reason="sevennet extra not installed")
    slab, _ = _slab()
    slab.calc = get_calculator("sevennet")
    e = slab.get_potential_energy()
    assert np.isfinite(e) and -5.0 < e / len(slab) < -1.0
