from __future__ import annotations

import numpy as np
import pytest
from ase.geometry import get_distances

from surfdiff_core.config import config_from_dict
from surfdiff_core.system import build_system, min_distance_matrix


@pytest.mark.parametrize(
    ("element", "facet", "a", "cell", "comp"),
    [("Ag", "fcc111", 4.09, "c(2x8)", "Ag6O5"), ("Cu", "fcc100", 3.61, "p(3x3)", "Cu2O3"),
     ("Pt", "fcc110", 3.92, "p(2x2)", "O2"), ("Ru", "hcp0001", 2.70, "p(2x2)", "O2")],
)
def test_random_placement_invariants(element, facet, a, cell, comp):
    cfg = config_from_dict({"substrate": {"element": element, "facet": facet, "lattice_constant": a},
                            "rss": {"cell": cell}})
    system = build_system(cfg.substrate, cfg.confinement, cell, comp)
    rng = np.random.default_rng(3)
    for _ in range(5):
        atoms = system.random_structure(rng)
        # substrate unchanged, composition exact, everything in the box
        np.testing.assert_allclose(atoms.positions[: system.n_substrate], system.template.positions)
        assert list(atoms.symbols[system.n_substrate :]) == list(system.overlayer)
        assert system.inside_box(atoms).all()
        # minimum distances under in-plane PBC, overlayer against everything
        _, d = get_distances(atoms.positions[system.n_substrate :], atoms.positions, cell=atoms.cell,
                             pbc=atoms.pbc)
        dmin = min_distance_matrix(atoms.get_chemical_symbols(), system.min_distance_scale)[system.n_substrate :]
        for k in range(len(system.overlayer)):
            d[k, system.n_substrate + k] = np.inf
        assert np.all(d >= dmin - 1e-9)
        assert atoms.get_array("movable").sum() == len(system.overlayer)


def test_placement_is_seeded():
    cfg = config_from_dict({"substrate": {"lattice_constant": 4.09}})
    system = build_system(cfg.substrate, cfg.confinement, "c(2x8)", "Ag4O2")
    a = system.random_overlayer(np.random.default_rng(7))
    b = system.random_overlayer(np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
