"""Relaxed bulk lattice constants of an oracle, cached on disk.

Slabs must be cut at the oracle's own lattice constant, otherwise the substrate starts strained and
every relaxation energy carries that strain. fcc: equation-of-state fit over isotropic strains of the
primitive cell. hcp: a and c both relax (cell filter), since c/a is not fixed by symmetry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii, reference_states
from ase.eos import EquationOfState
from threadpoolctl import threadpool_limits

from surfdiff_core.oracles.errors import OracleError
from surfdiff_core.oracles.registry import (
    canonical_settings,
    get_calculator,
    oracle_settings_hash,
)

logger = logging.getLogger(__name__)

CRYSTALS = ("fcc", "hcp")
_CACHE_VERSION = 1  # bump when the computation changes so stale values are not reused


def default_cache_dir() -> Path:
    """$SURFDIFF_CACHE_DIR, else ~/.cache/surfdiff."""
    env = os.environ.get("SURFDIFF_CACHE_DIR")
    return Path(env) if env else user_cache_dir()


def user_cache_dir() -> Path:
    """This user's own cache: where values go when a shared cache dir cannot be read or written."""
    return Path.home() / ".cache" / "surfdiff"


def _cache_files(cache_dir: Path | None) -> list[Path]:
    """The cache file to use; for the default (a shared $SURFDIFF_CACHE_DIR may be another user's) this user's
    own one after it, used when the first cannot be read or written. An explicit `cache_dir` has no fallback."""
    if cache_dir is not None:
        return [Path(cache_dir) / "lattice.json"]
    files = [default_cache_dir() / "lattice.json"]
    own = user_cache_dir() / "lattice.json"
    if own.absolute() != files[0].absolute():
        files.append(own)
    return files


def _may_write(path: Path) -> bool:
    """Whether this user may update the cache file (the file, or the nearest existing directory above it)."""
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if target == path:
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    return target.is_dir() and os.access(target, os.W_OK)


def lattice_cache_key(element: str, crystal: str, oracle: str, settings_hash: str) -> str:
    return f"v{_CACHE_VERSION}/{element}/{crystal}/{oracle}/{settings_hash}"


def bulk_lattice_constant(
    element: str,
    crystal: str,
    oracle: str,
    settings: dict | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """{'a': Å} (fcc) or {'a': Å, 'c': Å} (hcp) of `element` relaxed with `oracle`.

    Cached in <cache_dir>/lattice.json (default: $SURFDIFF_CACHE_DIR or ~/.cache/surfdiff), keyed by
    element, crystal, oracle and the hash of the oracle's resolved settings.
    """
    if element not in atomic_numbers or element == "X":
        raise OracleError(f"unknown element {element!r}")
    if crystal not in CRYSTALS:
        raise OracleError(f"crystal must be one of {list(CRYSTALS)}, got {crystal!r}")
    settings = dict(settings or {})
    settings_hash = oracle_settings_hash(oracle, settings)  # validates oracle name and keys
    key = lattice_cache_key(element, crystal, oracle, settings_hash)
    files = _cache_files(cache_dir)
    try:
        entries = _read_cache(files[0], strict=True)
        usable = _may_write(files[0])
    except OSError as exc:  # e.g. another user's 0600 file in a shared cache dir
        logger.warning("cannot read the lattice cache %s (%s)", files[0], exc.strerror or exc)
        entries, usable = {}, False
    if not usable:  # this user's own cache takes over
        files = files[1:]
        for path in files:
            entries = {**_read_cache(path), **entries}
    entry = entries.get(key)
    if entry is not None:
        return {k: float(entry[k]) for k in ("a", "c") if k in entry}

    start = time.perf_counter()
    result = _compute_lattice(element, crystal, oracle, settings)
    elapsed = time.perf_counter() - start
    logger.info("bulk %s %s with %s: %s (%.1f s)", crystal, element, oracle, result, elapsed)
    record = {
        **result, "element": element, "crystal": crystal, "oracle": oracle, "settings_hash": settings_hash,
        "settings": canonical_settings(oracle, settings), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _store_in_cache(files, key, record)
    return dict(result)


# ---- computation ----------------------------------------------------------------------------------------
def _compute_lattice(element: str, crystal: str, oracle: str, settings: dict[str, Any]) -> dict[str, float]:
    calc_settings = dict(settings)
    if oracle == "gpaw":
        # A strained perfect crystal keeps its symmetry: using it cuts the k-points, not the result.
        calc_settings["symmetry"] = "on"
    calc = get_calculator(oracle, **calc_settings)
    a0, c0 = _initial_guess(element, crystal)
    # One BLAS thread: these are many tiny evaluations (and GPAW is MPI-, not thread-parallel).
    with threadpool_limits(1, user_api="blas"):
        if crystal == "fcc":
            return {"a": _fcc_eos(element, a0, calc)}
        return _hcp_relax(element, a0, c0, calc)


def _initial_guess(element: str, crystal: str) -> tuple[float, float | None]:
    """Experimental a (and c) when the element's reference state is `crystal`, else a radius estimate."""
    ref = reference_states[atomic_numbers[element]] or {}
    sym = ref.get("symmetry")
    if sym == crystal == "fcc":
        return float(ref["a"]), None
    if sym == crystal == "hcp":
        return float(ref["a"]), float(ref["a"] * ref.get("c/a", math.sqrt(8 / 3)))
    # Nearest-neighbour distance from whatever is known, then the ideal close-packed cell.
    if sym == "fcc":
        d = ref["a"] / math.sqrt(2)
    elif sym == "bcc":
        d = ref["a"] * math.sqrt(3) / 2
    elif sym == "hcp":
        d = ref["a"]
    else:
        d = 2 * covalent_radii[atomic_numbers[element]]
    if crystal == "fcc":
        return float(d * math.sqrt(2)), None
    return float(d), float(d * math.sqrt(8 / 3))


def _energies(atoms: Atoms, cell0: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vols, ens = [], []
    for s in scales:
        atoms.set_cell(cell0 * s, scale_atoms=True)
        ens.append(atoms.get_potential_energy())
        vols.append(atoms.get_volume())
    return np.asarray(vols), np.asarray(ens)


def _fit_v0(vols: np.ndarray, ens: np.ndarray) -> float:
    for eos_name in ("birchmurnaghan", "sj"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v0, _, _ = EquationOfState(vols, ens, eos=eos_name).fit()
            if np.isfinite(v0) and v0 > 0:
                return float(v0)
        except Exception:  # noqa: BLE001 - try the next EOS form
            continue
    raise OracleError("equation-of-state fit failed")


def _fcc_eos(element: str, a0: float, calc: Any) -> float:
    """Coarse scan (±4 % in a, re-centred while the minimum sits at an edge), then a fine scan (±1.5 %)."""
    a = a0
    for _ in range(4):
        atoms = bulk(element, "fcc", a=a)
        atoms.calc = calc
        scales = np.linspace(0.96, 1.04, 9)
        vols, ens = _energies(atoms, np.array(atoms.cell), scales)
        i_min = int(np.argmin(ens))
        if 0 < i_min < len(ens) - 1:
            break
        a *= float(scales[i_min])  # minimum at the edge: move the window towards it
    else:
        raise OracleError(f"no energy minimum found for fcc {element} near a = {a0:.3f} Å")
    v0 = _fit_v0(vols, ens)
    a = float(a * (v0 / vols[len(vols) // 2]) ** (1 / 3))

    atoms = bulk(element, "fcc", a=a)
    atoms.calc = calc
    vols, ens = _energies(atoms, np.array(atoms.cell), np.linspace(0.985, 1.015, 7))
    v0 = _fit_v0(vols, ens)
    return float(a * (v0 / vols[len(vols) // 2]) ** (1 / 3))


def _hcp_relax(element: str, a0: float, c0: float | None, calc: Any) -> dict[str, float]:
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    atoms = bulk(element, "hcp", a=a0, c=c0)
    atoms.calc = calc
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    if not opt.run(fmax=1e-3, steps=300):
        raise OracleError(f"hcp {element} cell relaxation did not converge in 300 steps")
    lengths = atoms.cell.lengths()
    return {"a": float((lengths[0] + lengths[1]) / 2), "c": float(lengths[2])}


# ---- cache file -----------------------------------------------------------------------------------------
def _read_cache(path: Path, *, strict: bool = False) -> dict[str, Any]:
    """The cache's entries ({} when absent or not JSON). A file we may not read (another user's 0600 file, a
    path through a regular file) is {} too, with a warning, unless `strict`: then the OSError is raised."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if strict:
            raise
        logger.warning("ignoring unreadable lattice cache %s: %s", path, exc)
        return {}
    except ValueError as exc:
        logger.warning("ignoring unreadable lattice cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _store_in_cache(files: list[Path], key: str, record: Mapping[str, Any]) -> None:
    """Into the first cache file that can be updated; a value that cannot be cached is recomputed next time,
    never an error."""
    for path in files:
        try:
            _update_cache(path, key, record)
            return
        except OSError as exc:
            logger.warning("cannot write the lattice cache %s (%s)", path, exc.strerror or exc)
    logger.warning("the lattice constant is not cached: set SURFDIFF_CACHE_DIR to a directory you may write")


def _update_cache(path: Path, key: str, record: Mapping[str, Any]) -> None:
    """Re-read, add `key`, write to a temporary file and os.replace it: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Re-read (another process may have added entries meanwhile); a file we cannot read is never replaced by
    # one without its entries.
    data = _read_cache(path, strict=True)
    data[key] = dict(record)
    fd, tmp = tempfile.mkstemp(prefix=".lattice-", suffix=".json", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # a shared cache: other users read it (mkstemp makes 0600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
