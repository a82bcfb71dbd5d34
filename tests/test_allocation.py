"""Spreading one round's oracle labels over a sweep: uniform, or the targets that decide the phase diagram first."""

from __future__ import annotations

import math

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.evaluate.allocation import (
    envelope_excess,
    envelope_quotas,
    uniform_quotas,
    weighted_quotas,
)
from surfdiff_core.evaluate.phase import PhaseLine
from surfdiff_core.stages import active, rss, train
from surfdiff_core.stages.common import open_study_store
from tests.conftest import TINY_CONFIG


def test_uniform_quotas_are_even_and_exact() -> None:
    assert uniform_quotas(8, 4) == [2, 2, 2, 2]
    assert uniform_quotas(7, 3) == [3, 2, 2]
    assert uniform_quotas(2, 5) == [1, 1, 0, 0, 0]
    assert uniform_quotas(0, 3) == [0, 0, 0] and uniform_quotas(5, 0) == []


def test_weighted_quotas_floor_then_proportion() -> None:
    assert weighted_quotas(10, [1.0, 1.0, 0.0]) == [5, 4, 1]  # floor 1 each, 7 left split 3.5/3.5: tie -> first
    assert weighted_quotas(11, [3.0, 1.0, 0.0, 0.0]) == [6, 3, 1, 1]  # 7 left: 5.25 / 1.75 -> 5 + 2 by remainder
    assert weighted_quotas(2, [0.1, 0.9, 0.5]) == [0, 1, 1]  # too few for every floor: the best weights first
    assert weighted_quotas(6, [0.0, 0.0]) == [3, 3]  # no information: even
    for total in range(0, 30):
        q = weighted_quotas(total, [0.7, 0.2, 1e-9, 0.05])
        assert sum(q) == total and min(q) >= (1 if total >= 4 else 0)


def _line(label: str, at0: float, n_o: int, area: float = 10.0) -> PhaseLine:
    return PhaseLine(label, at0, -n_o / area)


def test_envelope_excess_is_zero_on_it_and_the_gap_above_it() -> None:
    # the clean surface (γ = 0) wins on [-3, -2], A on [-2, -1], B on [-1, 0.5]; C lies 0.01 eV/Å² above A
    a, b = _line("A", -0.2, 1), _line("B", -0.5, 4)
    c = PhaseLine("C", a.intercept + 0.01, a.slope)
    far = _line("far", 1.0, 1)
    excess = envelope_excess([a, b, c, far], (-3.0, 0.5))
    assert excess[0] == pytest.approx(0.0) and excess[1] == pytest.approx(0.0)
    assert excess[2] == pytest.approx(0.01)
    # 'far' is parallel to A: its least gap is to A's part of the envelope
    assert excess[3] == pytest.approx(1.2)


def test_envelope_quotas_favour_the_targets_on_the_envelope() -> None:
    a, b = _line("A", -0.2, 1), _line("B", -0.5, 4)
    c = PhaseLine("C", a.intercept + 0.01, a.slope)  # 0.01 eV/Å² × 10 Å² = 0.1 eV above the envelope
    quotas, excess = envelope_quotas(12, [a, b, c], [10.0] * 3, [0.05] * 3, (-3.0, 0.5))
    assert excess == pytest.approx([0.0, 0.0, 0.1])
    assert sum(quotas) == 12 and quotas[2] == 1 + round(9 * math.exp(-2) / (2 + math.exp(-2)))
    assert quotas[0] >= quotas[2] + 3 and quotas[1] >= quotas[2] + 3
    # a large uncertainty makes the three nearly equal
    wide, _ = envelope_quotas(12, [a, b, c], [10.0] * 3, [10.0] * 3, (-3.0, 0.5))
    assert max(wide) - min(wide) <= 1


@pytest.mark.slow
def test_envelope_allocation_runs_a_round_over_a_sweep(tmp_path) -> None:
    """Two targets, four labels a round: every label is spent, each target keeps its floor, and the round
    records how it split them and why."""
    path = tmp_path / "al.yaml"
    text = TINY_CONFIG.replace("STORE", str(tmp_path / "store")).replace(
        'targets: [{cell: "p(3x3)", composition: Ag2O1}]',
        'targets: [{cell: "p(3x3)", composition: Ag2O1}, {cell: "p(2x2)", composition: Ag1O1}]')
    path.write_text(text + "active_learning: {rounds: 1, relax_per_round: 2, epochs: 1, allocation: envelope}\n")
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        first = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        res = active.run(cfg, store, first, progress=False)
    record = res.rounds[0]
    assert record["allocation"] == "envelope" and sum(record["quotas"].values()) == 4
    assert all(q >= 1 for q in record["quotas"].values())
    excess = record["excess_eV"]
    assert set(excess) == set(record["quotas"]) and min(excess.values()) >= 0.0  # the clean surface may win
    nearer, farther = sorted(excess, key=excess.get)
    assert record["quotas"][nearer] >= record["quotas"][farther]
    assert res.relaxations == 4
