"""Sweeps in the config: expansion, limits, de-duplication, bounds and the one-line refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import yaml

from surfdiff_core.config import config_from_dict, load_config
from surfdiff_core.errors import ConfigError
from surfdiff_core.stages.common import sample_targets, target_system
from surfdiff_core.stages.sweep import expand_sweep, surface_area
from surfdiff_core.sweep import Counts, plan_sweep, sweep_compositions
from surfdiff_core.system import build_system

AG = {"element": "Ag", "facet": "fcc111", "lattice_constant": 4.09}


def _cfg(sweep: dict[str, Any] | None = None, targets: list[dict] | None = None, substrate: dict | None = None):
    sample: dict[str, Any] = {"targets": targets or []}
    if sweep is not None:
        sample["sweep"] = sweep
    return config_from_dict({"substrate": substrate or AG, "rss": {"cell": "p(2x2)"}, "sample": sample})


def _pairs(targets) -> list[tuple[Any, str]]:
    return [(t.cell, t.composition) for t in targets]


def _refusal(sweep: dict[str, Any], **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        _cfg(sweep, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---- expansion and order ------------------------------------------------------------------------------------
def test_formulas_then_combinations_cell_by_cell():
    cfg = _cfg({"cells": ["p(3x3)", "p(4x4)"], "compositions": ["Ag6O3", "O2Ag4"],
                "counts": {"Ag": {"min": 4, "max": 5}, "O": [3, 2]}})
    # the mapping's first element is the slowest; a list keeps its order; Ag4O2 == O2Ag4 (the formula first)
    comps = ["Ag6O3", "O2Ag4", "Ag4O3", "Ag5O3", "Ag5O2"]
    assert sweep_compositions(cfg.sample.sweep) == comps
    assert plan_sweep(cfg.sample.sweep, "fcc111") == [("p(3x3)", c) for c in comps] + [("p(4x4)", c) for c in comps]
    assert _pairs(sample_targets(cfg)) == [("p(3x3)", c) for c in comps] + [("p(4x4)", c) for c in comps]


def test_counts_forms():
    assert Counts.model_validate({"min": 4, "max": 12}).counts() == list(range(4, 13))
    assert Counts.model_validate({"min": 4, "max": 12, "step": 3}).counts() == [4, 7, 10]
    assert Counts.model_validate([4, 12]).counts() == [4, 12]  # a list is the counts, never a range
    assert Counts.model_validate([6, 2, 6]).counts() == [6, 2]
    assert Counts.model_validate(5).counts() == [5]


def test_a_combination_without_atoms_is_skipped():
    cfg = _cfg({"cells": ["p(3x3)"], "counts": {"Ag": [0, 1], "O": [0, 1]}})
    assert sweep_compositions(cfg.sample.sweep) == ["O1", "Ag1", "Ag1O1"]


def test_a_cell_given_by_name_and_by_matrix_is_one_cell():
    cfg = _cfg({"cells": ["p(3x3)", [[3, 0], [0, 3]], "3x3"], "compositions": ["O1", "O2"]})
    assert plan_sweep(cfg.sample.sweep, "fcc111") == [("p(3x3)", "O1"), ("p(3x3)", "O2")]


# ---- limits -------------------------------------------------------------------------------------------------
def test_coverage_drops_by_hand_count():
    sweep = {"cells": ["p(2x2)", "p(3x3)"], "counts": {"O": {"min": 1, "max": 6}}}
    # 4 and 9 surface sites: at most 0.5 ML is O1-O2 in p(2x2) and O1-O4 in p(3x3)
    cfg = _cfg({**sweep, "coverage": {"max": 0.5}})
    assert plan_sweep(cfg.sample.sweep, "fcc111") == ([("p(2x2)", f"O{n}") for n in (1, 2)]
                                                      + [("p(3x3)", f"O{n}") for n in (1, 2, 3, 4)])
    cfg = _cfg({**sweep, "cells": ["p(2x2)"], "coverage": {"min": 0.5, "max": 0.5}})  # both ends included
    assert plan_sweep(cfg.sample.sweep, "fcc111") == [("p(2x2)", "O2")]
    with pytest.raises(ConfigError, match=r"no composition fits cell 'p\(3x3\)'"):  # 4.5 atoms is not a count
        _cfg({**sweep, "coverage": {"min": 0.5, "max": 0.5}})


def test_ratios_drop_by_hand_count():
    cfg = _cfg({"cells": ["p(3x3)"], "counts": {"Ag": [2, 4], "O": {"min": 1, "max": 4}},
                "ratios": {"O/Ag": {"min": 0.5, "max": 1.0}}})
    assert sweep_compositions(cfg.sample.sweep) == ["Ag2O1", "Ag2O2", "Ag4O2", "Ag4O3", "Ag4O4"]
    # without the denominator's element a composition fails the ratio
    cfg = _cfg({"cells": ["p(3x3)"], "counts": {"Ag": [0, 2], "O": [1]}, "ratios": {"O/Ag": {"max": 1}}})
    assert sweep_compositions(cfg.sample.sweep) == ["Ag2O1"]


def test_atoms_per_area_drops_by_hand_count():
    # fcc100, a = 4 Å: 8 Å² per surface site; p(2x2) 32 Å², p(3x3) 72 Å²; at most 0.05 atoms/Å² is
    # 1.6 atoms in p(2x2) (O1) and 3.6 in p(3x3) (O1-O3): 4 of 12 kept
    cu = {"element": "Cu", "facet": "fcc100", "lattice_constant": 4.0}
    cfg = _cfg({"cells": ["p(2x2)", "p(3x3)"], "counts": {"O": {"min": 1, "max": 6}},
                "atoms_per_area": {"max": 0.05}}, substrate=cu)
    out = expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement)
    assert out.areas == pytest.approx({"p(2x2)": 32.0, "p(3x3)": 72.0})
    assert _pairs(out.targets) == [("p(2x2)", "O1"), ("p(3x3)", "O1"), ("p(3x3)", "O2"), ("p(3x3)", "O3")]
    assert (out.planned, out.dropped) == (12, 8)
    assert out.summary() == "sample.sweep: 4 targets kept of 12 (8 outside atoms_per_area)"
    assert _pairs(sample_targets(cfg)) == _pairs(out.targets)


def test_a_cell_the_limits_leave_empty_is_refused_by_name():
    # coverage: sqrt3 has 3 sites, so 0.2-0.6 ML is one atom, and every composition here has two or more
    with pytest.raises(ConfigError) as exc:
        _cfg({"cells": ["p(3x3)", "sqrt3"], "counts": {"Ag": [1, 2], "O": [1, 2]},
              "coverage": {"min": 0.2, "max": 0.6}})
    msg = str(exc.value)
    assert "no composition fits cell 'sqrt3' (3 surface sites)" in msg and "\n" not in msg
    # atoms_per_area: 0.05 atoms/Å² is 1.6 atoms in p(2x2) on fcc100 at a = 4 Å, and O2 is the smallest here
    cu = {"element": "Cu", "facet": "fcc100", "lattice_constant": 4.0}
    cfg = _cfg({"cells": ["p(3x3)", "p(2x2)"], "counts": {"O": [2, 3]}, "atoms_per_area": {"max": 0.05}}, substrate=cu)
    with pytest.raises(ConfigError) as exc:
        expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement)
    assert str(exc.value).startswith("sample.sweep.cells: no composition fits cell 'p(2x2)' (32.0 Å²)")


def test_atoms_per_area_needs_the_lattice_and_uses_it():
    cfg = _cfg({"cells": ["p(2x2)"], "counts": {"O": [1, 2]}, "atoms_per_area": {"min": 0.05}},
               substrate={**AG, "lattice_constant": "auto"})  # config load itself needs no lattice
    with pytest.raises(ConfigError, match="no relaxed bulk lattice constant"):
        expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement)
    # a = 4 Å: p(2x2) of fcc111 is 4 × 4²·√3/4 = 27.7 Å²; O1 is 0.036/Å², O2 0.072/Å²
    out = expand_sweep(cfg.sample.sweep, cfg.substrate, cfg.confinement, lattice={"a": 4.0})
    assert out.areas["p(2x2)"] == pytest.approx(16 * np.sqrt(3))
    assert _pairs(out.targets) == [("p(2x2)", "O2")]


def test_nothing_left_after_atoms_per_area_is_one_line():
    cfg = _cfg({"cells": ["p(2x2)"], "counts": {"O": [1, 2]}, "atoms_per_area": {"min": 1.0}})
    with pytest.raises(ConfigError, match=r"none of its 2 targets is within atoms_per_area") as exc:
        sample_targets(cfg)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("facet", "element", "cell"), [("fcc111", "Ag", "p(3x3)"), ("fcc100", "Cu", "c(2x2)"),
                                                        ("fcc110", "Cu", "p(2x3)"), ("hcp0001", "Ru", "sqrt3"),
                                                        ("fcc111", "Ag", [[2, 1], [0, 3]])])
def test_surface_area_is_the_systems_area(facet, element, cell):
    cfg = config_from_dict({"substrate": {"element": element, "facet": facet, "lattice_constant": 3.7},
                            "rss": {"cell": cell}})
    vectors = np.asarray(build_system(cfg.substrate, cfg.confinement, cell, "O1").template.get_cell())
    assert surface_area(cfg.substrate, cell, None) == pytest.approx(np.linalg.norm(np.cross(*vectors[:2])))


# ---- union with explicit targets ----------------------------------------------------------------------------
def test_explicit_targets_first_then_the_sweep_each_once():
    cfg = _cfg({"cells": ["p(3x3)", "p(4x4)"], "compositions": ["Ag4O2", "Ag6O3"]},
               targets=[{"cell": "p(4x4)", "composition": "Ag12O6"}, {"cell": [[3, 0], [0, 3]], "composition": "O2Ag4"},
                        {"cell": "p(4x4)", "composition": "Ag12O6"}])
    assert _pairs(sample_targets(cfg)) == [("p(4x4)", "Ag12O6"), ([[3, 0], [0, 3]], "O2Ag4"), ("p(3x3)", "Ag6O3"),
                                           ("p(4x4)", "Ag4O2"), ("p(4x4)", "Ag6O3")]
    # --cell/--composition still replace the config's targets
    assert _pairs(sample_targets(cfg, ["p(2x2)"], ["O1"])) == [("p(2x2)", "O1")]


def test_no_targets_and_no_sweep_is_refused():
    with pytest.raises(ConfigError, match="set sample.targets or sample.sweep"):
        sample_targets(_cfg())


# ---- refusals -----------------------------------------------------------------------------------------------
def test_too_large_a_sweep_is_refused_at_load_with_its_count():
    sweep = {"cells": ["p(3x3)", "p(4x4)", [[4, 0], [0, 4]]], "counts": {"Ag": {"min": 0, "max": 20},
                                                                       "O": {"min": 0, "max": 20}}}
    msg = _refusal(sweep)  # 21 × 21 - 1 (no atoms) = 440 compositions in 2 distinct cells
    assert "sample.sweep makes 880 targets" in msg and "max_targets 64" in msg
    assert len(plan_sweep(_cfg({**sweep, "max_targets": 1024}).sample.sweep, "fcc111")) == 880
    assert "less than or equal to 1024" in _refusal({**sweep, "max_targets": 5000})
    assert "1002001 combinations" in _refusal({"cells": ["p(3x3)"], "counts": {"Ag": {"min": 0, "max": 1000},
                                                                               "O": {"min": 0, "max": 1000}}})


def test_a_target_that_cannot_fit_is_refused_naming_it():
    cfg = _cfg({"cells": ["p(4x4)", "p(2x2)"], "compositions": ["O1", "Ag30O20"]})  # loads: no lattice needed
    with pytest.raises(ConfigError) as exc:
        sample_targets(cfg)
    msg = str(exc.value)
    assert msg.startswith("sample.sweep: composition Ag30O20 cannot fit into the p(2x2) confinement box")
    assert "\n" not in msg
    # a limit drops it instead: that is what the limits are for
    cfg = _cfg({"cells": ["p(4x4)", "p(2x2)"], "compositions": ["O1", "Ag30O20"], "coverage": {"max": 4}})
    assert _pairs(sample_targets(cfg)) == [("p(4x4)", "O1"), ("p(4x4)", "Ag30O20"), ("p(2x2)", "O1")]


@pytest.mark.parametrize(("sweep", "fragment"), [
    ({"cells": ["p(3x3)"], "counts": {"Qq": [1]}}, "sample.sweep.counts: unknown element 'Qq'"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag2Qq"]}, "unknown element 'Qq'"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": {"min": 12, "max": 4}}}, "range min 12 is larger than max 4"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": "4-12"}}, "counts are a list ([2, 4, 6]), a range"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": {"min": 4}}}, "a range needs both min and max"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": {"min": 4, "maks": 12}}}, "sample.sweep.counts.Ag.maks: unknown key"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": [-1, 2]}}, "greater than or equal to 0"),
    ({"cells": ["p(3x3)"], "counts": {"Ag": []}}, "empty list of counts"),
    ({"cells": ["p(3x3)"]}, "give compositions (formulas), counts"),
    ({"cells": [], "compositions": ["O1"]}, "sample.sweep.cells"),
    ({"cells": ["c(2x2)"], "compositions": ["O1"]}, "sample.sweep.cells.0: cell 'c(2x2)' is not defined"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag1"], "ratios": {"O/Ag": {"max": 1}}}, "'O/Ag' names O"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag1O1"], "ratios": {"OAg": {"max": 1}}}, "not of the form 'O/Ag'"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag1O1"], "ratios": {"O/Ag": {}}}, "give min, max or both"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag1O1"], "ratios": {"O/Ag": {"min": 2, "max": 1}}}, "larger than max"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag1O1"], "ratios": {"O/Ag": {"min": 2}}}, "no composition is within"),
    ({"cells": ["p(3x3)"], "compositions": ["Ag9O9"], "coverage": {"max": 1}}, "no target is within its coverage"),
    ({"cells": ["p(3x3)"], "compositions": ["O1"], "coverage": {"max": float("nan")}}, "sample.sweep.coverage.max"),
    ({"cells": ["p(3x3)"], "compositions": ["O1"], "sizes": [1]}, "sample.sweep.sizes: unknown key"),
])
def test_bad_sweeps_are_one_line(sweep, fragment):
    assert fragment in _refusal(sweep)


# ---- round trips and the shipped example --------------------------------------------------------------------
def test_round_trip_through_model_dump_and_yaml(tmp_path):
    cfg = _cfg({"cells": ["p(3x3)", [[4, 0], [0, 4]]], "compositions": ["Ag6O3"],
                "counts": {"Ag": {"min": 4, "max": 8, "step": 2}, "O": [2, 3]}, "coverage": {"max": 1.2},
                "atoms_per_area": {"min": 0.01}, "ratios": {"O/Ag": {"min": 0.25, "max": 1.0}}, "max_targets": 32},
               targets=[{"cell": "p(2x2)", "composition": "O1"}])
    assert config_from_dict(cfg.model_dump()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    again = load_config(path)
    assert again == cfg
    assert _pairs(sample_targets(again)) == _pairs(sample_targets(cfg))


def test_shipped_sweep_example(lattice_cache):
    cfg = load_config("configs/sweep-ag111-o.yaml")
    targets = sample_targets(cfg)
    assert 8 <= len(targets) <= 12
    assert {t.cell for t in targets} == {"p(3x3)", "p(4x4)"} and cfg.rss.cell == "c(2x8)"
    assert len({t.composition for t in targets}) >= 4
    for t in targets:  # every stage builds these systems: none may fail after the sweep was expanded
        target_system(cfg, t)
