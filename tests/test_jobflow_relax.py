from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from maggma.stores import MemoryStore, MontyStore
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp import Incar, Kpoints, Poscar

from surfdiff_core.oracles import OracleError
from surfdiff_core.relax.ase_relax import relax_atoms
from surfdiff_core.relax.jobflow_relax import RelaxOutcome, _in_input_order, make_relax_flow, run_relax_flow

HAS_GPAW = importlib.util.find_spec("gpaw") is not None


def _slab_atoms(size=(2, 2, 3), a=4.0636, vacuum=6.0, site="ontop") -> Atoms:
    slab = fcc111("Ag", size=size, a=a, vacuum=vacuum)
    add_adsorbate(slab, "O", 1.5, site)
    return slab


def _to_structure(slab: Atoms) -> tuple[Structure, list[int]]:
    """Structure with the bottom layer (largest tag) marked fixed in 'selective_dynamics'."""
    bottom = max(slab.get_tags())
    fixed = [i for i, t in enumerate(slab.get_tags()) if t == bottom]
    s = AseAtomsAdaptor.get_structure(slab)
    s.add_site_property("selective_dynamics", [[i not in fixed] * 3 for i in range(len(slab))])
    return s, fixed


def _moved(a: Structure, b: Structure) -> np.ndarray:
    return np.linalg.norm(a.cart_coords - b.cart_coords, axis=1)


def test_emt_flow_one_success_one_recorded_failure(tmp_path):
    slab = _slab_atoms()
    good, fixed = _to_structure(slab)
    poisoned = slab.copy()
    poisoned[-1].symbol = "Si"  # EMT has no Si parameters: the calculator raises inside the job
    bad, _ = _to_structure(poisoned)
    flow = make_relax_flow([(good, {"id": "good"}), (bad, {"id": "bad"})], "emt", {"fmax": 0.05, "steps": 100})
    store = MemoryStore(collection_name="relax")

    outcomes = run_relax_flow(flow, store, root_dir=tmp_path)

    assert [o.metadata["id"] for o in outcomes] == ["good", "bad"]
    ok, failed = outcomes
    assert ok.success and ok.error is None and ok.method == "emt"
    assert np.isfinite(ok.energy) and ok.forces.shape == (len(slab), 3) and ok.converged
    assert _moved(ok.structure, good)[fixed].max() < 1e-8  # selective dynamics reached the relaxation
    assert _moved(ok.structure, good)[-1] > 0.05
    # the same relaxation as the in-process path: same optimiser, same steps, same energy
    ref = relax_atoms(slab, EMT(), fmax=0.05, steps=100, optimizer="BFGS", fixed=fixed)
    assert ok.energy == pytest.approx(ref.energy, abs=1e-6)
    assert ok.steps == ref.steps
    assert Path(ok.job_dir).parent == tmp_path

    assert not failed.success and failed.structure is None and failed.energy is None
    assert failed.error == "NotImplementedError: No EMT-potential for Si"
    assert "Traceback" in failed.traceback and failed.input_structure == bad

    store.connect()
    docs = list(store.query({}, properties=["uuid", "metadata"]))
    assert [d["metadata"]["surfdiff"]["metadata"] for d in docs] == [{"id": "good"}]
    assert docs[0]["uuid"] == ok.job_uuid


def test_emt_flow_into_montystore(tmp_path):
    slab = _slab_atoms(size=(2, 2, 2))
    s, fixed = _to_structure(slab)
    store = MontyStore("relax", database_path=str(tmp_path / "db"))
    outcomes = run_relax_flow(make_relax_flow([s], "emt", {"steps": 50}), store, root_dir=tmp_path)
    assert len(outcomes) == 1 and outcomes[0].success, outcomes[0].error
    assert outcomes[0].metadata == {}
    store.ensure_index("uuid")  # montydb cannot index: tolerated, not NotImplementedError
    assert store.count() == 1


def test_make_relax_flow_validates_its_input():
    s, _ = _to_structure(_slab_atoms(size=(1, 1, 2)))
    with pytest.raises(OracleError, match="unknown relaxation method"):
        make_relax_flow([s], "lammps", {})
    with pytest.raises(OracleError, match="unknown setting"):
        make_relax_flow([s], "emt", {"fmaxx": 0.1})
    with pytest.raises(OracleError, match="optimizer"):
        make_relax_flow([s], "emt", {"optimizer": "CG"})
    with pytest.raises(OracleError, match="does not apply to vasp"):
        make_relax_flow([s], "vasp", {"optimizer": "BFGS"})
    flow = make_relax_flow([(s, {"k": 1})] * 3, "emt", {})
    assert len(flow.jobs) == 3 and len({j.name for j in flow.jobs}) == 3
    assert [j.metadata["surfdiff"]["index"] for j in flow.jobs] == [0, 1, 2]


@pytest.mark.chgnet
def test_chgnet_flow_keeps_the_substrate_fixed(tmp_path):
    pytest.importorskip("chgnet", reason="chgnet extra not installed")
    s, fixed = _to_structure(_slab_atoms(size=(2, 2, 2)))
    (out,) = run_relax_flow(make_relax_flow([s], "chgnet", {"steps": 3}), MemoryStore(), root_dir=tmp_path)
    assert out.success, out.error
    assert out.steps == 3 and np.isfinite(out.energy)
    assert _moved(out.structure, s)[fixed].max() < 1e-8
    assert _moved(out.structure, s).max() > 1e-4
    assert np.allclose(out.structure.lattice.matrix, s.lattice.matrix)  # relax_cell=False


@pytest.mark.gpaw
@pytest.mark.skipif(not HAS_GPAW, reason="gpaw not importable (pip install 'surfdiff[gpaw]')")
def test_gpaw_flow_on_a_tiny_slab(tmp_path):
    s, fixed = _to_structure(_slab_atoms(size=(1, 1, 2), a=4.15, vacuum=4.0, site="fcc"))
    settings = {
        "ecut": 200, "kpts": (2, 2, 1), "steps": 2, "fmax": 0.05,
        "convergence": {"energy": 1e-3, "density": 1e-3, "eigenstates": 1e-6},
    }
    (out,) = run_relax_flow(make_relax_flow([(s, {"dft": True})], "gpaw", settings), MemoryStore(), root_dir=tmp_path)
    assert out.success, out.traceback
    assert out.method == "gpaw" and out.metadata == {"dft": True}
    assert np.isfinite(out.energy) and out.forces.shape == (3, 3)
    assert 1 <= out.steps <= 2
    assert _moved(out.structure, s)[fixed].max() < 1e-8
    assert _moved(out.structure, s).max() > 1e-4


def test_vasp_flow_inputs_and_mocked_run(tmp_path, monkeypatch):
    """atomate2 writes the inputs and calls run_vasp -> custodian for real; only VASP itself and the
    parsing of its (absent) outputs are replaced."""
    import atomate2.vasp.jobs.base as vasp_base
    import atomate2.vasp.run as vasp_run
    from custodian.vasp.handlers import UnconvergedErrorHandler, VaspErrorHandler
    from custodian.vasp.jobs import VaspJob
    from emmet.core.tasks import OutputDoc, TaskDoc

    slab = _slab_atoms(vacuum=7.0, site="fcc")
    add_adsorbate(slab, "Ag", 1.8, "hcp")  # O before an Ag adatom: the site order must survive
    s, fixed = _to_structure(slab)
    i_o = len(slab) - 2
    flow = make_relax_flow(
        [(s, {"candidate": 7})], "vasp",
        {"fmax": 0.03, "incar": {"ENCUT": 400}, "kpts_density": 3.0, "write_input_set_kwargs": {"potcar_spec": True}},
    )
    seen: dict = {}

    def fake_custodian_run(self):
        incar = Incar.from_file("INCAR")
        kpoints = Kpoints.from_file("KPOINTS")
        poscar = Poscar.from_file("POSCAR")
        seen.update(incar=incar, kpoints=kpoints, poscar=poscar, handlers=self.handlers, jobs=self.jobs)
        final = poscar.structure.copy()
        (o_site,) = final.indices_from_symbol("O")
        final.translate_sites([o_site], [0.0, 0.0, -0.1], frac_coords=False)
        final.to(filename="CONTCAR", fmt="poscar")
        return []

    def fake_task_document(path, **kwargs):
        final = Poscar.from_file(Path(path) / "CONTCAR").structure
        forces = np.zeros((len(final), 3)).tolist()
        return TaskDoc(
            structure=final, state="successful",
            output=OutputDoc(structure=final, energy=-42.0, forces=forces),
        )

    monkeypatch.setattr(vasp_run.Custodian, "run", fake_custodian_run)
    monkeypatch.setattr(vasp_base, "get_vasp_task_document", fake_task_document)

    (out,) = run_relax_flow(flow, MemoryStore(), root_dir=tmp_path)

    assert out.success, out.traceback
    incar = seen["incar"]
    assert incar["ISIF"] == 2 and incar["IBRION"] == 2
    assert incar["LDIPOL"] is True and incar["IDIPOL"] == 3
    assert incar["EDIFFG"] == pytest.approx(-0.03) and incar["ENCUT"] == 400 and incar["ISMEAR"] == 1
    assert len(incar["DIPOL"]) == 3 and 0.0 < incar["DIPOL"][2] < 1.0
    kpts = seen["kpoints"].kpts[0]
    assert kpts[2] == 1 and kpts[0] == kpts[1] > 1
    sd = np.array(seen["poscar"].selective_dynamics)
    assert sd.shape == (len(slab), 3)
    assert (~sd.any(axis=1)).sum() == len(fixed)  # the bottom layer, all directions fixed
    # custodian got atomate2's VASP job and error handlers
    assert isinstance(seen["jobs"][0], VaspJob)
    kinds = {type(h) for h in seen["handlers"]}
    assert {VaspErrorHandler, UnconvergedErrorHandler} <= kinds
    # the outcome reads the (faked) VASP task document, back in the input's site order
    assert out.energy == -42.0 and out.metadata == {"candidate": 7}
    assert [site.specie.symbol for site in out.structure] == [site.specie.symbol for site in s]
    shift = out.structure.cart_coords - s.cart_coords
    assert shift[i_o] == pytest.approx([0.0, 0.0, -0.1], abs=1e-6)  # the fake "VASP" moved O
    assert np.abs(np.delete(shift, i_o, axis=0)).max() < 1e-6
    assert out.forces.shape == (len(slab), 3)


def test_outputs_in_species_sorted_order_are_mapped_back_to_the_input_order():
    slab = _slab_atoms(size=(1, 1, 2))
    add_adsorbate(slab, "Ag", 1.8, "hcp")  # ... Ag Ag O Ag
    s, _ = _to_structure(slab)
    perm = sorted(range(len(s)), key=lambda i: s[i].species.average_electroneg)  # O last
    assert perm != list(range(len(s)))
    sorted_s = Structure.from_sites([s[i] for i in perm])
    forces = np.arange(3 * len(s), dtype=float).reshape(-1, 3)
    out = RelaxOutcome(
        index=0, metadata={}, success=True, method="vasp", job_uuid="x", input_structure=s,
        structure=sorted_s, energy=0.0, forces=forces[perm],
    )
    back = _in_input_order(out)
    assert np.allclose(back.structure.cart_coords, s.cart_coords)
    assert np.array_equal(back.forces, forces)
    assert back.uuid == "x"
