"""The config sections that name an energy model of the oracle registry: `oracle` (RSS and the oracle labels of
samples) and `relax` (the relax stage's method), with the key that tells energies of different models apart."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, field_validator

from surfdiff_core.config_base import MAX_STEPS, MAX_STRUCTURES, _Strict


def energy_model_key(name: str, settings: dict[str, Any] | None = None) -> str:
    """Which energy model produced an energy: the oracle name, plus a hash of its settings when it has any.
    Energies of different keys are never compared or mixed unless the config says how."""
    if not settings:
        return name
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}:{digest}"


def _registered_oracles() -> list[str]:
    """The names of the oracle registry, the one list of energy models (imported when first needed: the registry
    package pulls in ASE's builders, which a config that is only read does not need)."""
    from surfdiff_core.oracles.registry import available_oracles

    return available_oracles()


def _oracle_choices(schema: dict[str, Any]) -> None:
    """JSON-schema choices (a dropdown in typed forms such as the Prefect UI): the registry's names when the
    schema is made, oracles registered by plugins included."""
    schema["enum"] = _registered_oracles()


def _check_oracle_name(value: str, what: str) -> str:
    valid = _registered_oracles()
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


class OracleConfig(_Strict):
    # Any name of the oracle registry (surfdiff_core/oracles/registry.py, or registered by a plugin).
    name: str = Field("emt", json_schema_extra=_oracle_choices)
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return _check_oracle_name(v, "oracle")

    @property
    def energy_model(self) -> str:
        return energy_model_key(self.name, self.settings)


class RelaxConfig(_Strict):
    method: str = Field("emt", json_schema_extra=_oracle_choices)  # an oracle of the registry, as oracle.name
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        return _check_oracle_name(v, "relaxation method")

    @property
    def energy_model(self) -> str:
        return energy_model_key(self.method, self.settings)
    top_k: int = Field(3, ge=1, le=MAX_STRUCTURES)  # best candidates per composition and cell
    fmax: float = Field(0.05, gt=0)
    steps: int = Field(200, ge=1, le=MAX_STEPS)
    # A failed relaxation is stored as an error document; later runs retry it until it has failed this often.
    max_attempts: int = Field(3, ge=1, le=100)
