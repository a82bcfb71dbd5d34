"""What every section of the study config (surfdiff_core/config.py) shares: the strict base model, the bounds on
planned sizes and seeds, and the one-line messages of validation errors."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from surfdiff_core.errors import ConfigError

CellSpec = str | list[list[int]]

# Bounds on sizes that are planned up front (one task, sample or relaxation each): beyond them a run would hang
# on planning alone, so they are refused with one line. Seeds: numpy and torch both take [0, 2**63).
MAX_STRUCTURES = 100_000
MAX_SAMPLES = 1_000_000
MAX_STEPS = 1_000_000
SEED_BOUND = 2**63
Seed = Annotated[int, Field(ge=0, lt=SEED_BOUND)]


def _non_finite_path(value: Any, where: str) -> str | None:
    """The key path of the first NaN/inf float inside plain values (dicts, lists), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_path(item, f"{where}.{key}")
        if found:
            return found
    return None


class _Strict(BaseModel):
    # allow_inf_nan=False: every typed float of every section must be finite (NaN/inf name their key).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _untyped_values_finite(self) -> Any:
        """Free-form values (oracle settings, references) are not typed floats: check them here."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                continue  # a section validates itself
            found = _non_finite_path(value, name)
            if found:
                raise ValueError(f"{found} must be a finite number")
        return self


def with_overrides(section: _Strict, updates: dict[str, Any]) -> Any:
    """A copy of a config section with the non-None `updates` applied and validated; a bad value is one line
    naming the command-line option (`--eta-dt: ...`)."""
    given = {k: v for k, v in updates.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        loc, msg, _ = _first_problem(exc)
        option = loc.split(".")[0] if loc else ""
        option = option if option in given else next(iter(given), option)  # a cross-field check names no field
        raise ConfigError(f"--{option.replace('_', '-')}: {msg}") from None


# Keys that left the study config, and where they went: a config still naming one is told so (not "unknown key").
_ABLATIONS = ("moved out of the study config into the discovery benchmark (benchmarks/discovery/ablations.py, "
              "run.py --extras): remove the key")
MOVED_KEYS = {"evaluate.guidance_samples": _ABLATIONS, "evaluate.steps_sweep": _ABLATIONS}

# Parts pydantic adds to an error location for the branch of a union or a validator: not keys of the config.
_BRANCH_TAG = re.compile(r"^(function-.*|float|int|str|bool|none|literal\[.*\]|list\[.*\]|tuple\[.*\]|"
                         r"dict\[.*\]|is-instance\[.*\]|constrained-.*)$")


def _first_problem(exc: ValidationError) -> tuple[str, str, int]:
    """(dotted key, message, number of keys with problems) of a validation error; a union's branches count once."""
    problems: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _BRANCH_TAG.match(str(p)))
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = MOVED_KEYS.get(loc, "unknown key (typo?)")
        problems.setdefault(loc, msg)
    # a moved key first: an old config's likeliest problem, and its line says what to do
    loc = next((k for k in problems if k in MOVED_KEYS), next(iter(problems)))
    return loc, problems[loc], len(problems)


def format_validation_error(exc: ValidationError, source: str = "") -> str:
    """One line: `source: key.path: message (and N more problems)`."""
    loc, msg, n = _first_problem(exc)
    extra = f" (and {n - 1} more problems)" if n > 1 else ""
    # A message that starts by naming its top-level key ("composition 'Qq3': ...") needs no second name.
    where = f"{loc}: " if loc and not msg.startswith(f"{loc} ") else ""
    return f"{source}: {where}{msg}{extra}" if source else f"{where}{msg}{extra}"
