from __future__ import annotations

import textwrap

import numpy as np
import pytest

from surfdiff_core.cells import cell_matrix
from surfdiff_core.config import SurfdiffConfig, config_from_dict, load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.system import build_system

A_AG = 4.09


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_configs_load():
    for name in ("demo", "ag111-o-paper", "cu100-o"):
        cfg = load_config(f"configs/{name}.yaml")
        assert isinstance(cfg, SurfdiffConfig)


@pytest.mark.parametrize(
    ("cell", "facet", "per_layer"),
    [("p(1x1)", "fcc111", 1), ("p(3x3)", "fcc111", 9), ("p(4x4)", "fcc111", 16), ("c(2x8)", "fcc111", 8),
     ("c(2×8)", "hcp0001", 8), ("sqrt3", "fcc111", 3), ("p(2x3)", "fcc100", 6), ("c(2x2)", "fcc100", 2),
     ("p(2x2)", "fcc110", 4), ([[2, 1], [0, 3]], "fcc111", 6)],
)
def test_named_cells_have_the_right_atom_counts(cell, facet, per_layer):
    cfg = config_from_dict({"substrate": {"element": "Cu" if facet != "hcp0001" else "Ru", "facet": facet,
                                          "lattice_constant": 3.6, "layers": 3},
                           "rss": {"cell": cell}})
    system = build_system(cfg.substrate, cfg.confinement, cell, "O1")
    assert system.n_substrate == 3 * per_layer
    tags = system.template.get_tags()
    assert sorted(set(tags)) == [1, 2, 3]
    assert all((tags == t).sum() == per_layer for t in (1, 2, 3))
    assert len(system.fixed_indices) == per_layer  # one fixed bottom layer
    assert np.all(system.template.positions[system.fixed_indices, 2] < system.surface_z - 1.0)


def test_c2x8_is_the_paper_matrix():
    assert cell_matrix("c(2x8)", "fcc111").tolist() == [[2, 0], [-1, 4]]
    assert cell_matrix("p(4x4)", "fcc111").tolist() == [[4, 0], [0, 4]]


@pytest.mark.parametrize("matrix", [[[3, 0], [1, 2]], [[2, -1], [1, 3]]])
def test_a_matrix_cells_label_names_the_same_cell(matrix):
    """Results and documents carry a matrix cell as its label; a later stage reading it back (the evaluation of
    a sampled sweep) builds the same system."""
    from surfdiff_core.cells import cell_label

    label = cell_label(matrix, "fcc100")
    assert cell_matrix(label, "fcc100").tolist() == matrix
    assert cell_label(label, "fcc100") == label == cell_label(label.replace(",", ", "), "fcc100")
    cfg = SurfdiffConfig()
    by_matrix = build_system(cfg.substrate, cfg.confinement, matrix, "O2", lattice={"a": A_AG})
    by_label = build_system(cfg.substrate, cfg.confinement, label, "O2", lattice={"a": A_AG})
    assert by_label.system_id == by_matrix.system_id and by_label.cell == by_matrix.cell == label
    with pytest.raises(ConfigError, match="singular"):
        cell_matrix("[[1,0],[2,0]]", "fcc100")


@pytest.mark.parametrize(("cell", "slug"), [("p(4x4)", "Ag6O3-p4x4"), ("c(2x8)", "Ag6O3-c2x8"),
                                            ("[[3,0],[1,2]]", "Ag6O3-3_0_1_2"), ("[[2,-1],[1,3]]", "Ag6O3-2_-1_1_3")])
def test_a_targets_file_name_has_no_brackets_commas_or_parentheses(cell, slug):
    from surfdiff_core.cells import file_slug

    assert file_slug("Ag6O3", cell) == slug


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("substrate: {element: Xx}\n", "unknown element 'Xx'"),
        ("substrate: {facet: fcc113}\n", "substrate.facet"),
        ("substrat: {element: Ag}\n", "substrat: unknown key"),
        ("substrate: {element: Ag, layrs: 3}\n", "substrate.layrs: unknown key"),
        ("rss: {cell: [[1, 0], [2, 0]]}\n", "singular"),
        ("rss: {cell: [[0, 1], [1, 0]]}\n", "negative determinant"),
        ("rss: {cell: q(2x2)}\n", "unknown cell name"),
        ("rss: {compositions: [Ag-2O3]}\n", "negative count"),
        ("rss: {compositions: [Ag2Zz]}\n", "unknown element 'Zz'"),
        ("rss: {n: -5}\n", "rss.n"),
        ("confinement: {z_min: -1.0, z_max: 3}\n", "below the surface"),
        ("confinement: {z_min: 3.0, z_max: 2}\n", "larger than z_min"),
        ("substrate: {layers: 2, fixed_layers: 2}\n", "fixed_layers"),
        ("substrate: {lattice_constant: -3}\n", "lattice_constant"),
        ("rss: [1, 2\n", "invalid YAML"),
    ],
)
def test_broken_configs_fail_with_one_clear_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    msg = str(exc.value)
    assert fragment in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key", ["guidance_samples", "steps_sweep"])
def test_a_key_moved_out_of_the_config_says_where_it_went(tmp_path, key):
    value = "4" if key == "guidance_samples" else "[25, 100]"
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, f"evaluate: {{budget: 4, {key}: {value}}}\n"))
    msg = str(exc.value)
    assert f"evaluate.{key}: " in msg and "benchmarks/discovery/ablations.py" in msg and "unknown key" not in msg
    assert "\n" not in msg


def test_box_outside_the_cell_is_rejected():
    cfg = config_from_dict({"substrate": {"lattice_constant": A_AG, "vacuum": 3.0},
                            "confinement": {"z_min": 0.5, "z_max": 8.0}})
    with pytest.raises(ConfigError, match="outside the cell"):
        build_system(cfg.substrate, cfg.confinement, "p(2x2)", "O1")


def test_composition_that_cannot_fit_is_rejected():
    cfg = config_from_dict({"substrate": {"lattice_constant": A_AG}, "confinement": {"z_min": 0.5, "z_max": 1.5}})
    with pytest.raises(ConfigError, match="cannot fit"):
        build_system(cfg.substrate, cfg.confinement, "p(1x1)", "Ag12O12")
    build_system(cfg.substrate, cfg.confinement, "p(3x3)", "Ag2O2")  # a sensible one passes


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope/none.yaml")
