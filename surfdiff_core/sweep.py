"""Sweeps: sampling targets as the product of cells × compositions, expanded and checked before any work.

Two steps. `plan_sweep` (here) is pure and runs at config load: the compositions (formulas, and every
combination of per-element counts), the coverage and ratio limits, and the max_targets bound.
`surfdiff_core.stages.sweep.expand_sweep` runs in the stage layer, where the substrate's lattice is known: it
drops the targets outside atoms_per_area (a limit per Å²) and refuses, with one line naming it, a target whose
composition cannot fit its confinement box.

config.py imports this module: it imports neither the config nor the system.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Annotated, Any

import numpy as np
from ase.data import atomic_numbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surfdiff_core.cells import cell_matrix
from surfdiff_core.composition import format_composition, normalise_composition, parse_composition
from surfdiff_core.errors import ConfigError

CellSpec = str | list[list[int]]  # as surfdiff_core.config.CellSpec
MAX_SWEEP_TARGETS = 1024  # hard ceiling of max_targets
MAX_COMBINATIONS = 100_000  # element-count combinations enumerated at config load, before the limits
MAX_COUNT = 1000  # atoms of one element in one target
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
_RATIO = re.compile(r"^([A-Z][a-z]?)/([A-Z][a-z]?)$")
_TOL = 1e-9  # limits are inclusive: 1/3 computed twice must not fall on either side


class _Strict(BaseModel):
    # config_base._Strict's settings (config imports this module); every field here is typed, so
    # allow_inf_nan=False already checks every float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _known(element: str) -> None:
    if element not in atomic_numbers or element == "X":
        raise ValueError(f"unknown element {element!r}")


class Bounds(_Strict):
    """An interval with both ends included, e.g. {min: 0.25, max: 1.0}; either end may be left out."""

    min: float | None = Field(None, ge=0)
    max: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self

    def holds(self, x: float) -> bool:
        return (self.min is None or x >= self.min - _TOL) and (self.max is None or x <= self.max + _TOL)


class Counts(_Strict):
    """Counts of one element: a list is the counts themselves (`[2, 4, 6]`, and `[4, 12]` is 4 and 12, never a
    range); a range is a mapping (`{min: 4, max: 12}`: every count from 4 to 12, both included; `step: 2` for
    every other one); one number is that count."""

    values: list[Count] | None = None
    min: Count | None = None
    max: Count | None = None
    step: int = Field(1, ge=1, le=MAX_COUNT)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool | str | float):
            raise ValueError(f"counts are a list ([2, 4, 6]), a range ({{min: 4, max: 12}}) or one number, "
                             f"not {data!r}")
        if isinstance(data, int):
            return {"values": [data]}
        if isinstance(data, list | tuple):
            return {"values": list(data)}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> Counts:
        ranged = self.min is not None or self.max is not None
        if self.values is not None:
            if ranged:
                raise ValueError("give a list of counts or a range {min, max}, not both")
            if not self.values:
                raise ValueError("empty list of counts")
        elif self.min is None or self.max is None:
            raise ValueError("a range needs both min and max (both included)")
        elif self.min > self.max:
            raise ValueError(f"range min {self.min} is larger than max {self.max}")
        return self

    def counts(self) -> list[int]:
        if self.values is not None:
            return list(dict.fromkeys(self.values))
        return list(range(self.min, self.max + 1, self.step))  # type: ignore[operator,arg-type]


class SweepConfig(_Strict):
    """Sampling targets as every cell × every composition, in that order (cell by cell).

    compositions: explicit formulas (`[Ag6O3, Ag8O4]`). counts: element -> Counts, meaning every combination,
    elements in the order written, first element slowest (`{Ag: {min: 4, max: 5}, O: [2, 3]}` -> Ag4O2,
    Ag4O3, Ag5O2, Ag5O3); a combination without atoms is skipped. Both may be given: the formulas come first.
    Limits drop targets (that is what they are for); every bound includes its ends:
    - coverage: overlayer atoms per substrate atom of the cell's top layer (monolayers), checked at load;
    - atoms_per_area: overlayer atoms per Å² of the cell's surface, checked when the sweep is expanded (the
      area needs the lattice constant, which 'auto' takes from the oracle);
    - ratios: `{O/Ag: {min: 0.25, max: 1.0}}` bounds count(O)/count(Ag); a composition without Ag fails it.
    A sweep that makes more than max_targets targets within its coverage and ratio limits is refused at load.
    A target within the limits that cannot fit its confinement box is refused, not dropped.
    """

    cells: list[CellSpec] = Field(min_length=1, max_length=64)
    compositions: list[str] = Field(default_factory=list)
    counts: dict[str, Counts] = Field(default_factory=dict)
    coverage: Bounds | None = None
    atoms_per_area: Bounds | None = None
    ratios: dict[str, Bounds] = Field(default_factory=dict)
    max_targets: int = Field(64, ge=1, le=MAX_SWEEP_TARGETS)

    @field_validator("compositions")
    @classmethod
    def _formulas(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(normalise_composition(c) for c in v))

    @field_validator("counts")
    @classmethod
    def _count_elements(cls, v: dict[str, Counts]) -> dict[str, Counts]:
        for el in v:
            _known(el)
        return v

    @field_validator("ratios")
    @classmethod
    def _ratio_elements(cls, v: dict[str, Bounds]) -> dict[str, Bounds]:
        for key in v:
            m = _RATIO.match(key)
            if m is None:
                raise ValueError(f"ratio {key!r} is not of the form 'O/Ag'")
            _known(m.group(1))
            _known(m.group(2))
            if m.group(1) == m.group(2):
                raise ValueError(f"ratio {key!r} divides an element by itself")
        return v

    @model_validator(mode="after")
    def _sized(self) -> SweepConfig:
        if not self.compositions and not self.counts:
            raise ValueError("give compositions (formulas), counts (per-element ranges or lists) or both")
        combos = math.prod(len(c.counts()) for c in self.counts.values()) if self.counts else 0
        if combos > MAX_COMBINATIONS:
            raise ValueError(f"counts make {combos} combinations, more than {MAX_COMBINATIONS} before the limits: "
                             f"narrow the ranges or use a step")
        held = {el for c in self.compositions for el in parse_composition(c)} | set(self.counts)
        for key in self.ratios:
            for el in key.split("/"):
                if el not in held:
                    raise ValueError(f"ratios: {key!r} names {el}, which no composition of the sweep holds")
        return self


def _within_ratios(sweep: SweepConfig, counts: dict[str, int]) -> bool:
    for key, bounds in sweep.ratios.items():
        num, den = key.split("/")
        if not counts.get(den) or not bounds.holds(counts.get(num, 0) / counts[den]):
            return False
    return True


def sweep_compositions(sweep: SweepConfig | None) -> list[str]:
    """The sweep's compositions within its ratios, formulas first, each once (whatever its element order)."""
    if sweep is None:
        return []
    elements = list(sweep.counts)
    combos = (dict(zip(elements, n, strict=True)) for n in itertools.product(*(c.counts() for c in
                                                                               sweep.counts.values())))
    found: dict[frozenset, str] = {}
    for counts in itertools.chain((parse_composition(c) for c in sweep.compositions), combos if elements else ()):
        counts = {el: n for el, n in counts.items() if n > 0}
        key = frozenset(counts.items())
        if counts and key not in found and _within_ratios(sweep, counts):
            found[key] = format_composition(counts)
    return list(found.values())


def cell_key(cell: CellSpec, facet: str) -> tuple[int, ...]:
    return tuple(int(x) for x in cell_matrix(cell, facet).flatten())


def plan_sweep(sweep: SweepConfig, facet: str) -> list[tuple[CellSpec, str]]:
    """(cell, composition) of every target within the coverage and ratio limits, cell by cell; a cell written
    twice (a name and its matrix) counts once. More than max_targets is refused with one line (ConfigError)."""
    comps = sweep_compositions(sweep)
    if not comps:
        raise ConfigError("sample.sweep: no composition is within its ratios")
    totals = [sum(parse_composition(c).values()) for c in comps]
    cells: dict[tuple[int, ...], CellSpec] = {}
    for c in sweep.cells:
        cells.setdefault(cell_key(c, facet), c)  # the first spelling of a cell is kept
    sites = {key: round(abs(np.linalg.det(np.reshape(key, (2, 2))))) for key in cells}

    def fits(total: int, key: tuple[int, ...]) -> bool:
        return sweep.coverage is None or sweep.coverage.holds(total / sites[key])

    per_total = Counter(totals)
    # count before listing: a wide range must not be enumerated cell by cell
    per_cell = {key: sum(k for t, k in per_total.items() if fits(t, key)) for key in cells}
    n = sum(per_cell.values())
    if n > sweep.max_targets:
        raise ConfigError(f"sample.sweep makes {n} targets ({len(cells)} cells × {len(comps)} compositions within "
                          f"its limits), more than max_targets {sweep.max_targets}: narrow the counts, add "
                          f"coverage or ratios, or raise max_targets (at most {MAX_SWEEP_TARGETS})")
    if n == 0:
        raise ConfigError(f"sample.sweep: no target is within its coverage limits ({len(cells)} cells × "
                          f"{len(comps)} compositions)")
    for key, cell in cells.items():  # a cell the limits leave empty is a mistake in the config, not a choice
        if per_cell[key] == 0:
            raise ConfigError(f"sample.sweep.cells: no composition fits cell {cell!r} ({sites[key]} surface sites) "
                              f"within coverage {sweep.coverage.model_dump(exclude_none=True)} ML "  # type: ignore[union-attr]
                              f"({min(totals)}–{max(totals)} overlayer atoms): drop the cell or widen the coverage")
    return [(cell, c) for key, cell in cells.items() for c, t in zip(comps, totals, strict=True) if fits(t, key)]
