"""Energy models ("oracles") behind one registry by name.

Each oracle has a fixed set of settings with defaults; unknown keys are errors so that a typo never
silently falls back to a default (and the settings hash, which keys caches, stays meaningful).
Optional dependencies are imported only when an oracle is used, and a missing one gives one line
naming the pip extra.

The registry is the one list of energy models: the config's `oracle.name` and `relax.method`, the relaxation
makers and the UI's choices all read it. A new in-process oracle is one `OracleSpec` entry in `_BUILTIN` below
(plus its pip extra), or, from a plugin or a test, one `register_oracle(spec)` call (docs/extending.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from surfdiff_core.oracles.calculators import (
    TRUST_MODEL_FILE,
    chgnet_elements,
    chgnet_factory,
    chgnet_packaged,
    emt_elements,
    emt_factory,
    gpaw_factory,
    sevennet_factory,
    sevennet_packaged,
)
from surfdiff_core.oracles.errors import MissingExtraError, OracleError

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator


@dataclass(frozen=True)
class OracleSpec:
    """One energy model. `factory` gets the resolved settings (defaults updated with the config's) and returns a
    fresh ASE calculator; every key of `defaults` is a setting, and no other key is accepted."""

    name: str
    description: str
    module: str  # top-level package that must import for the oracle to work
    extra: str | None  # pip extra of surfdiff that installs `module` (None: a core dependency)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[[dict[str, Any]], Calculator] | None = None  # None: not an in-process calculator
    route: str = "ase"  # 'ase' (in-process ASE calculator) or 'jobflow' (atomate2 job only)
    # The elements it can treat (a set, or a function giving one, called when asked); None: cannot tell.
    elements: Iterable[str] | Callable[[], Iterable[str]] | None = None
    # For a `model` setting that may name a weights file loaded with torch.load(weights_only=False): whether a
    # value is packaged weights (True) or a file, which loads only with settings.trust_model_file: true.
    packaged_model: Callable[[Any], bool] | None = None
    dft: bool = False  # electronic-structure reference: its relaxations are stored as `dft` documents

    @property
    def in_process(self) -> bool:
        return self.factory is not None


_BUILTIN: tuple[OracleSpec, ...] = (
    OracleSpec(
        "emt", "ASE effective-medium theory (Al Cu Ag Au Ni Pd Pt; H C N O for testing)", "ase", None,
        {"asap_cutoff": False}, emt_factory, elements=emt_elements,
    ),
    OracleSpec(
        "chgnet", "CHGNet universal potential, ASE calculator (weights shipped in the package)",
        "chgnet", "chgnet", {"model": "0.3.0", "device": "cpu"}, chgnet_factory, elements=chgnet_elements,
        packaged_model=chgnet_packaged,
    ),
    OracleSpec(
        "sevennet", "SevenNet universal potential, ASE calculator (weights shipped in the package)",
        "sevenn", "sevennet", {"model": "7net-0", "device": "cpu", "modal": None}, sevennet_factory,
        packaged_model=sevennet_packaged,
    ),
    OracleSpec(
        "gpaw", "GPAW plane-wave DFT (small defaults for a tiny local slab)", "gpaw", "gpaw",
        {
            "ecut": 350.0, "kpts": None, "kpts_density": 3.0, "xc": "PBE", "smearing": "fermi-dirac",
            "smearing_width": 0.1, "spinpol": False, "symmetry": "off", "convergence": None,
            "maxiter": 333, "txt": None,
        },
        gpaw_factory, dft=True,
    ),
    OracleSpec(
        "vasp", "VASP through atomate2/custodian (jobflow route only)", "atomate2", "vasp",
        {
            "incar": {}, "kpts": None, "kpts_density": 3.0, "potcar_functional": "PBE_54",
            "user_potcar_settings": {}, "run_vasp_kwargs": {}, "write_input_set_kwargs": {},
        },
        None, route="jobflow", dft=True,
    ),
)
_REGISTRY: dict[str, OracleSpec] = {spec.name: spec for spec in _BUILTIN}
_ROUTES = ("ase", "jobflow")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")


# ---- public API -----------------------------------------------------------------------------------------
def available_oracles(installed_only: bool = False) -> list[str]:
    """Registered oracle names; with installed_only, those whose dependency can be imported."""
    names = sorted(_REGISTRY)
    if installed_only:
        names = [n for n in names if importlib.util.find_spec(_REGISTRY[n].module) is not None]
    return names


def register_oracle(spec: OracleSpec) -> None:
    """Add an energy model (a plugin's, a test's): from now on configs, relaxations and the UI's choices accept
    `spec.name`. It is known to this process only: worker processes (rss.workers > 1) and cluster jobs see it
    when the module that registers it is imported there too, so a built-in oracle belongs in `_BUILTIN`."""
    if not isinstance(spec, OracleSpec):
        raise OracleError(f"register_oracle takes an OracleSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        raise OracleError(f"oracle name {spec.name!r}: lowercase letters, digits, '-' and '_', starting with a "
                          f"letter, at most 40 characters")
    if spec.name in _REGISTRY:
        raise OracleError(f"oracle {spec.name!r} is already registered ({_REGISTRY[spec.name].description})")
    if spec.route not in _ROUTES:
        raise OracleError(f"oracle {spec.name!r}: route must be one of {list(_ROUTES)}, got {spec.route!r}")
    if spec.route == "ase" and spec.factory is None:
        raise OracleError(f"oracle {spec.name!r}: an in-process ('ase' route) oracle needs a factory")
    if TRUST_MODEL_FILE in spec.defaults:
        raise OracleError(f"oracle {spec.name!r}: {TRUST_MODEL_FILE!r} is not a setting of its own (see "
                          f"OracleSpec.packaged_model)")
    try:
        _jsonable(spec.defaults)  # the settings hash that keys caches needs plain JSON values
    except OracleError as exc:
        raise OracleError(f"oracle {spec.name!r}: default {exc}") from None
    _REGISTRY[spec.name] = spec


def unregister_oracle(name: str) -> OracleSpec:
    """Remove an oracle added with `register_oracle` (the built-in ones stay); returns its spec."""
    spec = get_oracle_spec(name)
    if any(b.name == name for b in _BUILTIN):
        raise OracleError(f"oracle {name!r} is built in and cannot be unregistered")
    return _REGISTRY.pop(name, spec)


@contextmanager
def registered_oracle(spec: OracleSpec) -> Iterator[OracleSpec]:
    """`spec` registered for the duration of a with-block (tests, notebooks)."""
    register_oracle(spec)
    try:
        yield spec
    finally:
        if _REGISTRY.get(spec.name) is spec:
            del _REGISTRY[spec.name]


def get_oracle_spec(name: str) -> OracleSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise OracleError(f"unknown oracle {name!r}; valid oracles: {', '.join(sorted(_REGISTRY))}") from None


def resolve_settings(name: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of `name` updated with `settings`; unknown keys raise OracleError, and so does a model file
    that the settings do not trust (see TRUST_MODEL_FILE)."""
    spec = get_oracle_spec(name)
    settings = dict(settings or {})
    allowed = set(spec.defaults) | ({TRUST_MODEL_FILE} if spec.packaged_model is not None else set())
    unknown = sorted(set(settings) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "(none)"
        keys = ", ".join(map(repr, unknown))
        raise OracleError(f"unknown setting(s) {keys} for oracle {name!r}; valid: {valid}")
    resolved = {k: _copy_default(v) for k, v in spec.defaults.items()}
    resolved.update(settings)
    _check_model_file(spec, resolved)
    return resolved


def _check_model_file(spec: OracleSpec, resolved: Mapping[str, Any]) -> None:
    if spec.packaged_model is None:
        return
    name = spec.name
    trusted = resolved.get(TRUST_MODEL_FILE, False)
    if not isinstance(trusted, bool):
        raise OracleError(f"oracle {name!r}: settings.{TRUST_MODEL_FILE} must be true or false, got {trusted!r}")
    model = resolved.get("model")
    if spec.packaged_model(model):
        _check_packaged_name(name, model)
        return
    if trusted:
        return
    raise OracleError(
        f"oracle {name!r}: settings.model {str(model)!r} is not a packaged model but a file, which {name} loads "
        f"with torch.load(weights_only=False) and so can run any code it holds; only the packaged weights load "
        f"unless the settings say {TRUST_MODEL_FILE}: true"
    )


def _check_packaged_name(name: str, model: Any) -> None:
    """A packaged model that the package does not ship: one line now, not a failure after the store was made.
    CHGNet's are the folders of chgnet/pretrained (found without importing chgnet and torch)."""
    if name != "chgnet" or model is None:
        return
    spec = importlib.util.find_spec("chgnet")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: require_oracle names the extra
    from pathlib import Path

    shipped = sorted(p.name for root in spec.submodule_search_locations
                     for p in (Path(root) / "pretrained").glob("*") if p.is_dir())
    if shipped and str(model) not in shipped:
        raise OracleError(f"oracle 'chgnet': settings.model {str(model)!r} is no packaged CHGNet model; choose "
                          f"one of {', '.join(shipped)} (or a model file with {TRUST_MODEL_FILE}: true)")


def supported_elements(name: str) -> frozenset[str] | None:
    """The elements oracle `name` can treat, or None where surfdiff cannot tell without running it (SevenNet's
    species live in its checkpoint, GPAW's and VASP's in the installed setups and POTCARs)."""
    elements = get_oracle_spec(name).elements
    if elements is None:
        return None
    return frozenset(elements() if callable(elements) else elements)


def check_elements(name: str, elements: Mapping[str, Iterable[str]]) -> None:
    """Refuse, in one line, elements that oracle `name` cannot treat; `elements` maps where they come from
    (a config key) to the elements named there."""
    supported = supported_elements(name)
    if supported is None:
        return
    for where, names in elements.items():
        bad = sorted(set(names) - supported)
        if bad:
            raise OracleError(
                f"{where}: oracle {name!r} cannot treat {', '.join(bad)}; it supports "
                f"{', '.join(sorted(supported)) if len(supported) < 20 else 'H to Pu'}"
            )


def require_oracle(name: str) -> OracleSpec:
    """The spec of `name` after checking its optional dependency imports (MissingExtraError otherwise)."""
    spec = get_oracle_spec(name)
    try:
        importlib.import_module(spec.module)
    except ImportError as exc:
        hint = f"pip install 'surfdiff[{spec.extra}]'" if spec.extra else "pip install surfdiff"
        msg = f"oracle {name!r} needs the optional dependency {spec.module}: {hint}"
        raise MissingExtraError(msg) from exc
    return spec


def get_calculator(name: str, **settings: Any) -> Calculator:
    """A fresh ASE calculator for oracle `name` with `settings` (see `resolve_settings`)."""
    spec = get_oracle_spec(name)
    resolved = resolve_settings(name, settings)
    if not spec.in_process:
        raise OracleError(
            f"oracle {name!r} is not an in-process ASE calculator: relax with it through the jobflow route, "
            f"surfdiff_core.relax.jobflow_relax.make_relax_flow(structures, method={name!r}, settings=...)"
        )
    require_oracle(name)
    assert spec.factory is not None
    return spec.factory(resolved)


def canonical_settings(name: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resolved settings as plain JSON types (tuples -> lists, numpy -> Python)."""
    return _jsonable(resolve_settings(name, settings))


def oracle_settings_hash(name: str, settings: Mapping[str, Any] | None = None) -> str:
    """Stable 16-hex-digit hash of (oracle, resolved settings): defaults count, key order does not."""
    # Numbers hash by value, so ecut=350 and ecut=350.0 are the same settings; trusting a file changes no energy.
    physics = {k: v for k, v in canonical_settings(name, settings).items() if k != TRUST_MODEL_FILE}
    payload = {"oracle": name, "settings": _numbers_as_float(physics)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _copy_default(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy_default(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy_default(x) for x in v]
    return v


def _numbers_as_float(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _numbers_as_float(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_numbers_as_float(x) for x in v]
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, PurePath):
        return str(v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise OracleError(f"setting value {v!r} of type {type(v).__name__} is not JSON-serialisable")
