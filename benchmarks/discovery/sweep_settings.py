"""What a sweep benchmark's settings id hashes: the study config apart from the seed, where the store is and how
many workers run, and kept stable as the config schema grows.

- A key removed from the schema since runs were recorded is put back at the value every recorded run had
  (`REMOVED_CONFIG_KEYS`), so removing it changes no id.
- A field added since (not in `settings_fields.json`, the leaf paths of the recorded runs) counts only when it
  is set off its default: a new option at its default measures the same protocol, so it does not split the
  history; set to something else, it does.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from surfdiff_core.config import SurfdiffConfig

HERE = Path(__file__).resolve().parent

# Study-config keys removed since runs were recorded (#26: the ablations moved to ablations.py), at the values
# every recorded run had: put back before hashing, so that removing them does not change a settings id.
REMOVED_CONFIG_KEYS = {"evaluate": {"guidance_samples": 0, "steps_sweep": []}}
_ABSENT = object()


def with_removed_keys(config: dict) -> dict:
    out = copy.deepcopy(config)
    for section, keys in REMOVED_CONFIG_KEYS.items():
        out[section] = {**keys, **out.get(section, {})}
    return out


@functools.cache
def recorded_fields() -> frozenset[str]:
    return frozenset(json.loads((HERE / "settings_fields.json").read_text())["paths"])


@functools.cache
def _defaults() -> dict:
    return SurfdiffConfig().model_dump(mode="json")


def without_new_defaults(config: dict, known: frozenset[str] | None = None) -> dict:
    """`config` less the fields not in `known` (default: the recorded ones) that hold their schema default. A
    field whose default cannot be looked up (inside a section that defaults to none) is kept."""
    known = recorded_fields() if known is None else known
    out = copy.deepcopy(config)

    def prune(node: dict, defaults: Any, prefix: str) -> None:
        for key in list(node):
            path = f"{prefix}{key}"
            value = node[key]
            default = defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT
            if isinstance(value, dict) and value and path not in known:
                if any(k.startswith(f"{path}.") for k in known):  # a recorded section: its fields one by one
                    prune(value, default, f"{path}.")
                elif value == default:
                    del node[key]
            elif path not in known and default is not _ABSENT and value == default:
                del node[key]

    prune(out, _defaults(), "")
    return out


def settings_hash(config: dict) -> str:
    """The id of `config` (a study config without store, seed-dependent values already neutral)."""
    d = without_new_defaults(with_removed_keys(config))
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
