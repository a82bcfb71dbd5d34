"""Issue 13, hardening: bad values refused in one line (exit 2, nothing written), failed work retried a bounded
number of times, unreadable checkpoints set aside, relaxation folders cleaned up, model files trusted only on
request, and a shared lattice cache that another user owns."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT

from flows.cli import main
from surfdiff_core.config import config_from_dict, load_config, with_overrides
from surfdiff_core.errors import ConfigError
from surfdiff_core.oracles import OracleError, oracle_settings_hash, resolve_settings
from surfdiff_core.oracles import lattice as lattice_mod
from surfdiff_core.query import build_criteria, parse_cell_filter
from surfdiff_core.rss import run_rss
from surfdiff_core.store import open_store

ROOT = Path(__file__).resolve().parents[1]
SLAB = "substrate: {lattice_constant: 4.06, layers: 2, fixed_layers: 1, vacuum: 7}\n"
SEARCH = "rss: {cell: p(2x2), compositions: [Ag1O1], n: 2, fmax: 0.2, steps: 30}\n"


def _config_text(text: str, store: Path) -> str:
    """`text` completed with a small valid slab and search where it names none, and the store at `store`."""
    out = text
    if "substrate:" not in text:
        out = SLAB + out
    if "rss:" not in text:
        out += SEARCH
    return out + f"store: {{backend: sqlite, path: {store}}}\n"


# ---- bad values: one line, exit 2, store untouched ------------------------------------------------------------
# (command, config text, extra arguments, fragment of the one stderr line). The config text is completed with a
# small valid slab, search and store (a text starting with '#', or None, is written as it is); in the arguments
# "{file}" is a regular file, "{dir}" an existing empty directory, "{config}" the config.
BAD_INPUTS = [
    # the config file itself
    ("rss", None, [], "empty config: give at least a name"),  # None: the file is written as it is, empty
    ("rss", "# nothing but a comment\n", [], "configs/demo.yaml"),
    ("rss", "rss: {n: 1}\nrss: {n: 2}\n", [], "key 'rss' is written twice (lines 2 and 3)"),
    ("rss", "rss:\n  cell: p(2x2)\n  fmax: 0.1\n  fmax: 0.2\n", [], "key 'fmax' is written twice"),
    ("rss", "sample:\n  targets:\n  - {cell: p(2x2), composition: O1, composition: O2}\n", [], "written twice"),
    # every float finite, typed or free-form, at any depth
    ("rss", "rss: {cell: p(2x2), fmax: .inf}\n", [], "rss.fmax: Input should be a finite number"),
    ("rss", "substrate: {lattice_constant: .nan}\n", [], "substrate.lattice_constant: Input should be a finite"),
    ("rss", "confinement: {z_min: .nan, z_max: 4}\n", [], "confinement.z_min: Input should be a finite number"),
    ("rss", "evaluate: {dmu_range: [-1, .inf]}\n", [], "evaluate.dmu_range.1: Input should be a finite number"),
    ("rss", "oracle: {settings: {asap_cutoff: .nan}}\n", [], "settings.asap_cutoff must be a finite number"),
    ("rss", "relax: {settings: {fmax: [1, .inf]}}\n", [], "settings.fmax.1 must be a finite number"),
    ("rss", "model: {cutoff: -.inf}\n", [], "model.cutoff: Input should be a finite number"),
    # integers range-checked, sizes bounded
    ("rss", "rss: {cell: p(2x2), seed: -1}\n", [], "rss.seed: Input should be greater than or equal to 0"),
    ("rss", "rss: {cell: p(2x2), n: 100000000000}\n", [], "rss.n: Input should be less than or equal to 100000"),
    ("rss", "rss: {cell: p(2x2), max_attempts: 0}\n", [], "rss.max_attempts"),
    ("rss", "substrate: {lattice_constant: 1e300}\n", [], "substrate.lattice_constant: lattice_constant must be"),
    # elements the energy model cannot treat: substrate, RSS compositions, sampling targets, a relax method
    ("rss", "substrate: {element: U, lattice_constant: 4.0}\n", [], "oracle 'emt' cannot treat U"),
    ("rss", "rss: {cell: p(2x2), compositions: [Ag2U1]}\n", [], "composition Ag2U1: oracle 'emt' cannot treat U"),
    ("sample", "sample: {targets: [{cell: p(2x2), composition: Th1}]}\n", [], "cannot treat Th"),
    ("relax", "oracle: {name: chgnet}\nsample: {targets: [{cell: p(2x2), composition: Ag1Si1}]}\n",
     ["--method", "emt"], "composition Ag1Si1: oracle 'emt' cannot treat Si"),
    # a model file is not loaded unless trusted
    ("rss", "oracle: {name: chgnet, settings: {model: /tmp/weights.pt}}\n", [], "trust_model_file: true"),
    ("rss", "oracle: {name: sevennet, settings: {model: ./ckpt.pth, trust_model_file: 1}}\n", [],
     "trust_model_file must be true or false"),
    # command-line options: through the same models
    ("rss", "", ["--n", "0"], "nothing to do: 0 structures asked"),
    ("rss", "", ["--n", "100000000000"], "--n: Input should be less than or equal to 100000"),
    ("rss", "", ["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    ("rss", "", ["--workers", "0"], "--workers: Input should be greater than or equal to 1"),
    ("rss", "", ["--store", "{file}"], "is a file: give the store's directory"),
    ("sample", "", ["--cell", "p(2x2)", "--composition", "Qq3"], "composition 'Qq3': unknown element 'Qq'"),
    ("sample", "", ["--cell", "p(2x2)", "--composition", "Ag1", "--eta-dt", "inf"], "--eta-dt: Input should be a"),
    ("sample", "", ["--cell", "p(2x2)", "--composition", "Ag1", "--seed", "-1"], "--seed"),
    ("sample", "", ["--cell", "p(2x2)", "--composition", "Ag1", "--n", "10000000000"], "--n: Input should be less"),
    ("train", "", ["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
    ("train", "", [], "no results store at"),
    ("relax", "", ["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
    ("relax", "", [], "no results store at"),  # nothing generated, not even a store: said, and none created
    ("evaluate", "", ["--budget", "0"], "--budget: Input should be greater than or equal to 1"),
    ("query", "", ["--config", "{config}"], "no results store at"),
    ("query", "", ["--store", "{dir}", "--cell", "p(4x)"], "--cell 'p(4x)': unknown cell name"),
    ("query", "", ["--store", "{dir}", "--cell", "[[1, 2], [2, 4]]"], "singular"),
    ("query", "", ["--store", "{dir}", "--max-energy", "nan"], "--max-energy nan: give a finite energy"),
    ("query", "", ["--store", "{dir}", "--composition", "Ag-1"], "negative count"),
]


def _bad_input_paths(tmp_path: Path, text: str | None, args: list[str]) -> tuple[Path, Path, Path, list[str]]:
    store, cfg, empty_dir = tmp_path / "store", tmp_path / "bad.yaml", tmp_path / "empty"
    regular = tmp_path / "a-file"
    regular.write_text("not a store\n")
    empty_dir.mkdir()
    cfg.write_text(text or "" if text is None or text.startswith("#") else _config_text(text, store))
    argv = [a.format(file=regular, dir=empty_dir, config=cfg) for a in args]
    return store, cfg, empty_dir, argv


@pytest.mark.parametrize(("command", "text", "args", "fragment"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, command, text, args, fragment):
    """In-process through the CLI's own `main` (the same code path as the console script, ~50x faster than a
    process each); test_bad_inputs_in_real_processes below runs a sample of them as processes."""
    store, cfg, empty_dir, argv = _bad_input_paths(tmp_path, text, args)
    before = cfg.read_bytes()
    full = [command, *argv] if command == "query" else [command, str(cfg), *argv]
    assert main(full) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert lines[0].startswith(f"surfdiff {command}: error: ") and "Traceback" not in err
    assert not store.exists() and not list(empty_dir.iterdir())  # no store created, none written into
    assert cfg.read_bytes() == before


@pytest.mark.parametrize(
    ("kind", "fragment"), [("binary", "not a text (UTF-8) YAML file"), ("directory", "is a directory")]
)
def test_unreadable_configs_name_the_file(tmp_path, capsys, kind, fragment):
    path = tmp_path / "cfg.yaml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.mkdir()
    assert main(["rss", str(path)]) == 2
    line, *rest = capsys.readouterr().err.strip().splitlines()
    assert not rest and str(path) in line and fragment in line


def test_bad_inputs_in_real_processes(tmp_path):
    """A sample of the table as real processes (run side by side): exit 2, one line, no traceback, no store."""
    picks = [0, 2, 5, 16, 27, 29, 38]
    procs = []
    for k in picks:
        command, text, args, fragment = BAD_INPUTS[k]
        case = tmp_path / f"case{k}"
        case.mkdir()
        store, cfg, _, argv = _bad_input_paths(case, text, args)
        full = [command, *argv] if command == "query" else [command, str(cfg), *argv]
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *full], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((proc, store, fragment))
    for proc, store, fragment in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
        assert not store.exists()


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SLAB + "rss: &search {cell: p(2x2), compositions: [Ag1O1], fmax: 0.2}\n"
                    "evaluate:\n  references: {}\n  <<: {tol: 0.1}\n  tol: 0.2\n")
    assert load_config(path).evaluate.tol == 0.2


def test_overrides_name_the_option_and_keep_cross_checks():
    cfg = config_from_dict({})
    with pytest.raises(ConfigError, match=r"^--eta-dt: Input should be a finite number$"):
        with_overrides(cfg.sample, {"eta_dt": float("inf")})
    assert with_overrides(cfg.rss, {"n": 0, "seed": 2**62}).seed == 2**62
    with pytest.raises(ConfigError, match="--seed"):
        with_overrides(cfg.rss, {"seed": 2**63})


def test_query_filters_are_parsed():
    assert parse_cell_filter("4x4") == "p(4x4)" and parse_cell_filter("c(2x8)") == "c(2x8)"
    assert parse_cell_filter("[[2, 0], [-1, 4]]") == "[[2,0],[-1,4]]"  # the label systems store for matrices
    for bad in ("p(4x)", "q(2x2)", "[[1, 2]", "[[0, 1], [1, 0]]"):
        with pytest.raises(ConfigError, match="--cell"):
            parse_cell_filter(bad)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match="--max-energy"):
            build_criteria(max_energy=bad)
    assert build_criteria(max_energy=-3)["energy"] == {"$lte": -3.0}


def test_rss_of_zero_structures_does_not_touch_the_store(tmp_path):
    """The library's answer to n = 0 (the `rss` command refuses it): an empty report, no store opened."""
    cfg = config_from_dict({"substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1},
                            "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"]},
                            "store": {"backend": "sqlite", "path": str(tmp_path / "store")}})
    report = run_rss(cfg, open_store(cfg.store), n=0, progress=False)
    assert report.planned == 0 and report.doc_ids == []
    assert not (tmp_path / "store").exists()


# ---- failures that retry ------------------------------------------------------------------------------------
class _EMTFailing(EMT):
    """EMT whose first `failures` calculations raise: an energy model that fails now and works later."""

    failures = 0

    def calculate(self, *args, **kwargs):
        if type(self).failures > 0:
            type(self).failures -= 1
            raise RuntimeError("SCF did not converge (simulated)")
        return super().calculate(*args, **kwargs)


@pytest.fixture
def flaky_emt(monkeypatch):
    """Every EMT the code builds (in-process, RSS or jobflow) fails `flaky_emt.failures` times, then works."""
    import ase.calculators.emt

    _EMTFailing.failures = 0
    monkeypatch.setattr(ase.calculators.emt, "EMT", _EMTFailing)  # imported where used: RSS and atomate2 alike
    return _EMTFailing


def _small_study(tmp_path, **rss):
    return config_from_dict({
        "name": "retry", "substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1, "vacuum": 7},
        "confinement": {"z_min": 0.5, "z_max": 4.0},
        "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"], "n": 2, "fmax": 0.2, "steps": 30, **rss},
        "relax": {"method": "emt", "steps": 30, "fmax": 0.2, "max_attempts": 2},
        "store": {"backend": "sqlite", "path": str(tmp_path / "store")},
    })


def test_failed_rss_structure_is_retried_and_its_failure_kept(tmp_path, flaky_emt):
    cfg = _small_study(tmp_path)
    store = open_store(cfg.store)
    flaky_emt.failures = 1  # the first structure's first energy call fails
    first = run_rss(cfg, store, progress=False)
    assert (first.done, first.failed, first.retried) == (1, 1, 0)
    failed_id = next(d.doc_id for d in store.find({"error": {"$ne": None}}))
    doc = store.get(failed_id)
    assert doc.meta["attempts"] == 1 and doc.meta["errors"] == [doc.error] and "simulated" in doc.error

    second = run_rss(cfg, store, progress=False)  # works now: retried by default
    assert (second.done, second.failed, second.retried, second.skipped) == (1, 0, 1, 1)
    doc = store.get(failed_id)
    assert doc.error is None and doc.valid and np.isfinite(doc.energy)
    assert doc.meta["attempts"] == 2 and "simulated" in doc.meta["errors"][0]  # the failure is still on record
    third = run_rss(cfg, store, progress=False)
    assert (third.done, third.retried, third.skipped) == (0, 0, 2)


def test_rss_retries_stop_at_max_attempts(tmp_path, flaky_emt):
    cfg = _small_study(tmp_path, n=1, max_attempts=2)
    store = open_store(cfg.store)
    flaky_emt.failures = 10**6  # fails every time
    reports = [run_rss(cfg, store, progress=False) for _ in range(3)]
    assert [(r.failed, r.retried, r.given_up) for r in reports] == [(1, 0, 0), (1, 1, 0), (0, 0, 1)]
    (doc,) = store.find({})
    assert doc.meta["attempts"] == 2 and len(doc.meta["errors"]) == 2


def test_failed_relaxation_is_retried_through_jobflow(tmp_path, flaky_emt, monkeypatch):
    from maggma.stores import MemoryStore

    from surfdiff_core.stages import relax

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the jobflow folders, to look for leftovers
    cfg = _small_study(tmp_path)
    store = open_store(cfg.store)
    run_rss(cfg, store, progress=False)
    candidates = sorted(store.find({"source": "rss"}), key=lambda d: d.doc_id)
    jobs = MemoryStore(collection_name="jobs")
    flaky_emt.failures = 1  # the first relaxation job fails inside jobflow
    first = relax.run(cfg, store, candidates=candidates, run_id="r1", jobs_store=jobs)
    assert (first.relaxed, first.failed, first.retried) == (1, 1, 0)
    failed = next(store.find({"source": "relaxed", "error": {"$ne": None}}))
    assert failed.meta["attempts"] == 1 and "simulated" in failed.meta["errors"][0]
    kept = list(tmp_path.glob("surfdiff-relax-*"))
    assert len(kept) == 1  # the failure's folder stays for the post-mortem

    second = relax.run(cfg, store, candidates=candidates, run_id="r2", jobs_store=jobs)
    assert (second.relaxed, second.failed, second.retried, second.skipped) == (1, 0, 1, 1)
    doc = store.get(failed.doc_id)
    assert doc.error is None and doc.energy is not None
    assert doc.meta["attempts"] == 2 and "simulated" in doc.meta["errors"][0]
    assert list(tmp_path.glob("surfdiff-relax-*")) == kept  # the successful run left no folder


def test_oracle_relaxation_of_samples_retries(tmp_path, flaky_emt):
    from surfdiff_core.stages.common import training_system
    from surfdiff_core.stages.oracle_relax import relax_samples

    cfg = _small_study(tmp_path, n=1)
    store = open_store(cfg.store)
    run_rss(cfg, store, progress=False)
    cands = list(store.find({"source": "rss"}))
    system = training_system(cfg)
    flaky_emt.failures = 1
    (doc,) = relax_samples(cfg, store, system, cands, _EMTFailing(), tag="t", progress=False)
    assert doc.error and doc.meta["attempts"] == 1
    (doc,) = relax_samples(cfg, store, system, cands, _EMTFailing(), tag="t", progress=False)
    assert doc.error is None and doc.meta["attempts"] == 2 and "simulated" in doc.meta["errors"][0]


# ---- relaxation folders ----------------------------------------------------------------------------------------
def _slab_structure(poison: bool = False):
    from ase.build import add_adsorbate, fcc111
    from pymatgen.io.ase import AseAtomsAdaptor

    slab = fcc111("Ag", size=(2, 2, 2), a=4.06, vacuum=6.0)
    add_adsorbate(slab, "Si" if poison else "O", 1.5, "fcc")
    s = AseAtomsAdaptor.get_structure(slab)
    s.add_site_property("selective_dynamics", [[t != 2] * 3 for t in slab.get_tags()])
    return s


def test_relaxation_folders_are_removed_unless_asked_or_failed(tmp_path, monkeypatch):
    from surfdiff_core.relax.jobflow_relax import make_relax_flow, run_relax_flow

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SURFDIFF_KEEP_RELAX_DIRS", raising=False)
    (ok,) = run_relax_flow(make_relax_flow([_slab_structure()], "emt", {"steps": 20}))
    assert ok.success and ok.job_dir is None and not list(tmp_path.glob("surfdiff-relax-*"))

    good, bad = run_relax_flow(make_relax_flow([_slab_structure(), _slab_structure(poison=True)], "emt",
                                               {"steps": 20}))
    (kept,) = tmp_path.glob("surfdiff-relax-*")
    assert good.success and good.job_dir is None and not bad.success and bad.job_dir == str(kept)
    assert len(list(kept.iterdir())) == 1  # the failed job's folder; the successful one's is gone

    monkeypatch.setenv("SURFDIFF_KEEP_RELAX_DIRS", "1")
    (ok,) = run_relax_flow(make_relax_flow([_slab_structure()], "emt", {"steps": 20}))
    assert ok.job_dir and Path(ok.job_dir).is_dir()

    given = tmp_path / "mine"
    (ok,) = run_relax_flow(make_relax_flow([_slab_structure()], "emt", {"steps": 20}), root_dir=given)
    assert Path(ok.job_dir).parent == given  # a caller's folder is the caller's


# ---- training checkpoints --------------------------------------------------------------------------------------
def test_truncated_last_checkpoint_is_set_aside_and_training_starts_over(tmp_path, caplog, capsys, monkeypatch):
    text = _config_text("train: {epochs: 3, batch_size: 4, patience: 10, energy_window: 5.0}\n"
                        "model: {n_features: 8, n_rbf: 8, n_interactions: 1, cutoff: 4.0, time_features: 8}\n"
                        "rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 6, fmax: 0.2, steps: 30}\n"
                        "sample: {n: 2, steps: 5, relax_steps: 2, batch_size: 2}\n",  # train's sampling check
                        tmp_path / "data" / "store")
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(text)
    assert main(["rss", str(cfg_path)]) == 0
    assert main(["train", str(cfg_path), "--epochs", "1"]) == 0
    assert main(["train", str(cfg_path), "--epochs", "2"]) == 0
    assert "resumed from its checkpoint at epoch 1" in capsys.readouterr().out  # resuming is said

    (last,) = (tmp_path / "data" / "checkpoints").glob("*-last.pt")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a half-written file
    with caplog.at_level(logging.WARNING, logger="surfdiff_core.train.trainer"):
        assert main(["train", str(cfg_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" not in out and "2 epochs" in out  # started over
    (aside,) = last.parent.glob(f"{last.name}.corrupt-*")
    assert aside.stat().st_size < last.stat().st_size
    (record,) = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert "\n" not in record.getMessage() and aside.name in record.getMessage()

    # a second corrupt checkpoint within the same second keeps the first one's aside
    import time

    import surfdiff_core.train.trainer as trainer_module

    class FrozenClock:  # the trainer's clock only: the stamp stays one second
        def __getattr__(self, name):
            return getattr(time, name)

        def strftime(self, fmt, *args):
            return "20261207-120000"

    monkeypatch.setattr(trainer_module, "time", FrozenClock())
    for _ in range(2):
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        assert main(["train", str(cfg_path), "--epochs", "1"]) == 0
    asides = sorted(p.name for p in last.parent.glob(f"{last.name}.corrupt-20261207-120000*"))
    assert asides == [f"{last.name}.corrupt-20261207-120000", f"{last.name}.corrupt-20261207-120000-2"]


# ---- model files ----------------------------------------------------------------------------------------------
def test_model_files_load_only_when_trusted():
    assert resolve_settings("chgnet", {})["model"] == "0.3.0"  # the packaged weights need no flag
    assert resolve_settings("sevennet", {"model": "7net-0"})["model"] == "7net-0"
    for name, model in (("chgnet", "/data/mine.pth"), ("sevennet", "/data/mine.pth"), ("sevennet", "not-a-name")):
        with pytest.raises(OracleError, match=r"torch\.load\(weights_only=False\).*trust_model_file: true"):
            resolve_settings(name, {"model": model})
        trusted = resolve_settings(name, {"model": model, "trust_model_file": True})
        assert trusted["model"] == model
    with pytest.raises(OracleError, match="unknown setting"):
        resolve_settings("emt", {"trust_model_file": True})  # no model files there
    # trusting a file changes no energy: the settings hash (lattice cache key) ignores the flag
    assert oracle_settings_hash("chgnet", {"trust_model_file": True}) == oracle_settings_hash("chgnet", {})


# ---- shared lattice cache -------------------------------------------------------------------------------------
@pytest.fixture
def shared_cache(tmp_path, monkeypatch):
    """$SURFDIFF_CACHE_DIR is a shared directory; HOME (this user's own cache) is elsewhere."""
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    home.mkdir()
    monkeypatch.setenv("SURFDIFF_CACHE_DIR", str(shared))
    monkeypatch.setenv("HOME", str(home))
    return shared, home / ".cache" / "surfdiff" / "lattice.json"


def test_lattice_cache_is_readable_by_other_users(shared_cache):
    shared, _ = shared_cache
    lattice_mod.bulk_lattice_constant("Ag", "fcc", "emt")
    assert (shared / "lattice.json").stat().st_mode & 0o777 == 0o644


def test_another_users_unreadable_cache_is_left_alone(shared_cache, monkeypatch):
    """Tests run as root, which file modes do not stop, so the other user's 0600 file is simulated: reading it
    raises PermissionError, as open() does for a second, non-root user. What this shows: no crash, the value
    is computed, the other user's file is not replaced, and this user's own cache keeps the value."""
    shared, own = shared_cache
    theirs = shared / "lattice.json"
    theirs.write_text('{"their": "entries"}')
    real_read = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == theirs:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    a = lattice_mod.bulk_lattice_constant("Ag", "fcc", "emt")["a"]
    assert 3.9 < a < 4.2
    assert real_read(theirs) == '{"their": "entries"}'
    assert any(k.startswith("v1/Ag/fcc/emt/") for k in json.loads(real_read(own)))
    monkeypatch.setattr(lattice_mod, "_compute_lattice", lambda *a, **k: pytest.fail("recomputed"))
    assert lattice_mod.bulk_lattice_constant("Ag", "fcc", "emt")["a"] == a  # from this user's own cache


def test_unusable_cache_dir_never_crashes(tmp_path, shared_cache, monkeypatch):
    """A cache path that cannot be a directory (root is stopped by that too): computed, kept in the user's own
    cache; with an explicit unusable cache_dir the value is just not cached."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("SURFDIFF_CACHE_DIR", str(blocker))
    _, own = shared_cache
    a = lattice_mod.bulk_lattice_constant("Ag", "fcc", "emt")["a"]
    assert own.exists() and 3.9 < a < 4.2
    assert lattice_mod.bulk_lattice_constant("Ag", "fcc", "emt", cache_dir=blocker)["a"] == pytest.approx(a)
