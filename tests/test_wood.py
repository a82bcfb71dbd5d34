"""Cells in Wood's notation: the slab built from a name has the lengths, angle and atom count the name says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from surfdiff_core.cells import canonical_cell_name, cell_criteria, cell_label, cell_matrix
from surfdiff_core.config import config_from_dict
from surfdiff_core.errors import ConfigError
from surfdiff_core.system import build_system


def _system(cell, facet: str):
    element = "Ru" if facet == "hcp0001" else "Cu"
    cfg = config_from_dict({"substrate": {"element": element, "facet": facet, "lattice_constant": 3.6,
                                          "layers": 2}, "rss": {"cell": cell, "compositions": ["O1"]}})
    return build_system(cfg.substrate, cfg.confinement, cell, "O1")


@pytest.mark.parametrize(
    ("name", "facet", "lengths", "angle", "per_layer"),
    [("(2√2×√2)R45°", "fcc100", (2 * math.sqrt(2), math.sqrt(2)), 45, 4),  # the Cu(100)–O missing-row cell
     ("(√5×√5)R26.6°", "fcc100", (math.sqrt(5), math.sqrt(5)), 26.57, 5),
     ("(√7×√7)R19.1°", "fcc111", (math.sqrt(7), math.sqrt(7)), 19.11, 7),
     ("(2√3 x 2√3)R30", "fcc111", (2 * math.sqrt(3), 2 * math.sqrt(3)), 30, 12),
     ("(√13×√13)R13.9°", "hcp0001", (math.sqrt(13), math.sqrt(13)), 13.90, 13),
     ("(2x1)", "fcc110", (2, 1), 0, 2),
     ("(3×1)", "fcc111", (3, 1), 0, 3)],
)
def test_a_rotated_cell_has_the_lengths_and_angle_it_names(name, facet, lengths, angle, per_layer):
    primitive = _system("p(1x1)", facet).template.cell[:2, :2]
    system = _system(name, facet)
    cell = system.template.cell[:2, :2]
    for i in range(2):
        assert np.linalg.norm(cell[i]) == pytest.approx(lengths[i] * np.linalg.norm(primitive[i]), rel=1e-9)
        cos = cell[i] @ primitive[i] / (np.linalg.norm(cell[i]) * np.linalg.norm(primitive[i]))
        assert math.degrees(math.acos(min(1.0, cos))) == pytest.approx(angle, abs=0.01)
    assert system.n_substrate == 2 * per_layer


@pytest.mark.parametrize(("name", "facet", "per_layer"), [("c(4x2)", "fcc100", 4), ("c(2×4)", "fcc110", 4),
                                                          ("c(2x8)", "fcc100", 8), ("c(6x2)", "fcc100", 6)])
def test_a_centred_cell_holds_its_rectangle_and_the_centre(name, facet, per_layer):
    """c(n×m): the lattice of the n×m rectangle with a point at its centre (half its area per cell)."""
    system = _system(name, facet)
    assert system.n_substrate == 2 * per_layer
    matrix = cell_matrix(name, facet)
    n, m = (int(x) for x in canonical_cell_name(name)[2:-1].split("x"))
    for vector in ([n, 0], [0, m], [n / 2, m / 2]):  # in primitive units: each a lattice vector of the cell
        assert np.allclose(np.rint(np.linalg.solve(matrix.T, vector)), np.linalg.solve(matrix.T, vector))


def _same_lattice(m1: np.ndarray, m2: np.ndarray) -> bool:
    change = m1 @ np.linalg.inv(m2)
    return np.allclose(change, np.rint(change)) and abs(round(np.linalg.det(change))) == 1


def test_wood_names_agree_with_the_named_cells():
    assert _same_lattice(cell_matrix("(√2×√2)R45°", "fcc100"), cell_matrix("c(2x2)", "fcc100"))
    assert canonical_cell_name("(√3×√3)R30°") == canonical_cell_name("(sqrt(3) x sqrt(3))R30") == "sqrt3"
    assert canonical_cell_name("(4x4)") == "p(4x4)"
    # on fcc100 the centred reading of c(2x8) is the only one; on fcc111 the paper's matrix stays
    assert cell_matrix("c(2x8)", "fcc111").tolist() == [[2, 0], [-1, 4]]


@pytest.mark.parametrize("spelling", ["(2√2×√2)R45°", "(2sqrt2 x sqrt2)R45", "p(2sqrt(2)xsqrt(2))r45",
                                      "(√8×√2)R45°"])
def test_every_spelling_of_a_wood_cell_is_one_label(spelling):
    assert cell_label(spelling, "fcc100") == "(2sqrt2xsqrt2)r45"
    assert cell_matrix(spelling, "fcc100").tolist() == cell_matrix("(2sqrt2xsqrt2)r45", "fcc100").tolist()
    # the label reads back as the same cell (stored documents and results carry it)
    assert cell_matrix(cell_label(spelling, "fcc100"), "fcc100").tolist() == [[2, 2], [-1, 1]]
    assert cell_criteria(spelling)["$or"][0]["cell"]["$in"][:2] == ["(2sqrt2xsqrt2)r45", "[[2,2],[-1,1]]"]


@pytest.mark.parametrize(
    ("name", "facet", "fragment"),
    [("(2x2)R45", "fcc100", "does not fit the fcc100 lattice"),
     ("(√7×√7)R19.1°", "fcc100", "does not fit the fcc100 lattice"),
     ("(√7×√7)R25°", "fcc111", "does not fit the fcc111 lattice"),
     ("c(4x2)", "fcc111", "not defined on facet fcc111"),
     ("(0x2)", "fcc100", "unknown cell name"),
     ("(2x)", "fcc100", "unknown cell name")],
)
def test_a_wood_cell_that_does_not_fit_is_refused_in_one_line(name, facet, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        cell_matrix(name, facet)
    assert "\n" not in str(err.value) and repr(name) in str(err.value)


def test_a_sweep_takes_wood_cells():
    from surfdiff_core.stages.sweep import expand_sweep

    cfg = config_from_dict({"substrate": {"element": "Cu", "facet": "fcc100", "lattice_constant": 3.6},
                            "sample": {"sweep": {"cells": ["(2√2×√2)R45°", "c(4x2)", "[[2,2],[-1,1]]"],
                                                 "counts": {"Cu": [0, 1], "O": [1, 2]}}}})
    expansion = expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement)
    # the matrix spells the first cell again: it counts once
    assert sorted({cell_label(t.cell, "fcc100") for t in expansion.targets}) == ["(2sqrt2xsqrt2)r45", "c(4x2)"]
    assert len(expansion.targets) == 2 * 4
    assert expansion.areas["c(4x2)"] == pytest.approx(4 * (3.6 / math.sqrt(2)) ** 2)


def test_a_query_filters_by_a_wood_cell():
    from surfdiff_core.query import parse_cell_filter

    assert parse_cell_filter("(2√2 × √2)R45°") == "(2sqrt2xsqrt2)r45"
    assert parse_cell_filter("(√3×√3)R30°") == "sqrt3"
    with pytest.raises(ConfigError, match="does not fit"):
        parse_cell_filter("(2x2)R45")
