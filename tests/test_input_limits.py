"""Issue 27: every input is checked before any work or store write. The YAML's size, depth and alias expansion,
the atoms a cell or composition implies, model names, a missing store for commands that read it, the store's
folder (read-only, full) and an unreachable MongoDB: each one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from flows.cli import main
from surfdiff_core.config import load_config
from surfdiff_core.errors import ConfigError
from tests.conftest import TINY_CONFIG


def _config(tmp_path: Path, text: str | None = None, store: Path | None = None) -> Path:
    path = tmp_path / "study.yaml"
    text = TINY_CONFIG if text is None else text
    path.write_text(text.replace("STORE", str(store or tmp_path / "data" / "store")))
    return path


def refused(capsys, args: list[str], fragment: str) -> str:
    """The command exits 2 with one stderr line containing `fragment`."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and fragment in err, err
    return err


def _bomb(levels: int = 8) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# ---- the YAML itself ------------------------------------------------------------------------------------------
def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("name: bomb\n" + _bomb(8))  # 10^9 values once expanded, 900 bytes
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="once its aliases are expanded"):
        load_config(cfg)
    assert time.perf_counter() - start < 0.2
    refused(capsys, ["rss", cfg], "more than 100000 values once its aliases are expanded")
    assert not (tmp_path / "data").exists()


def test_shared_anchors_within_the_budget_still_load(tmp_path):
    text = TINY_CONFIG.replace("compositions: [Ag1O1, Ag2O1]", "compositions: &c [Ag1O1, Ag2O1]").replace(
        "train: {epochs: 3,", "train: {compositions: *c, epochs: 3,")
    assert load_config(_config(tmp_path, text)).train.compositions == ["Ag1O1", "Ag2O1"]


@pytest.mark.parametrize("text, fragment", [
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
    ("".join(" " * i + f"k{i}:\n" for i in range(500)), "nested deeper than 64 levels (line 65)"),
    ("name: &a [*a]\n", "recursive YAML"),
], ids=["flow-5000", "block-500", "recursive"])
def test_deep_or_recursive_yaml_is_one_line(tmp_path, capsys, text, fragment):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(text)
    start = time.perf_counter()
    refused(capsys, ["rss", cfg], fragment)
    assert time.perf_counter() - start < 2


def test_a_huge_config_file_is_not_read(tmp_path, capsys):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("name: x\n" + "# padding\n" * 200_000)
    refused(capsys, ["rss", cfg], "a config has at most 1048576")


# ---- sizes a cell or a composition implies --------------------------------------------------------------------
def test_a_huge_cell_is_refused_before_rss(tmp_path, capsys):
    cfg = _config(tmp_path, TINY_CONFIG.replace("cell: p(2x2)", "cell: p(400x400)"))
    refused(capsys, ["rss", cfg], "rss.cell: cell 'p(400x400)' with 2 substrate layers makes 320000 substrate atoms")
    assert not (tmp_path / "data").exists()


def test_a_huge_cell_or_composition_on_the_command_line(tmp_path, capsys):
    cfg = _config(tmp_path)
    refused(capsys, ["sample", cfg, "--cell", "p(400x400)", "--composition", "Ag1O1"], "at most 10000 are supported")
    refused(capsys, ["sample", cfg, "--cell", "p(2x2)", "--composition", "Ag100000O1"],
            "composition 'Ag100000O1' has 100001 atoms; at most 10000")
    refused(capsys, ["sample", cfg, "--cell", "p(2x2)", "--composition", "O" + "9" * 5000], "too many O atoms")
    assert not (tmp_path / "data").exists()


# ---- models, stores -------------------------------------------------------------------------------------------
def test_an_unknown_chgnet_model_is_refused_before_the_store(tmp_path, capsys):
    pytest.importorskip("chgnet")
    cfg = _config(tmp_path, TINY_CONFIG.replace("oracle: {name: emt}",
                                                "oracle: {name: chgnet, settings: {model: '9.9.9'}}"))
    refused(capsys, ["rss", cfg], "settings.model '9.9.9' is no packaged CHGNet model; choose one of")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_reading_commands_do_not_create_a_missing_store(tmp_path, capsys, command):
    cfg = _config(tmp_path)
    refused(capsys, [command, cfg, "--store", tmp_path / "nowhere"], "no results store at")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "data").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MB tmpfs (root only): its mount point, unmounted afterwards."""
    where = tmp_path / "fs"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)


def test_a_full_disk_is_found_before_any_work(small_fs, capsys):
    cfg = _config(small_fs.parent, store=small_fs / "store")
    refused(capsys, ["rss", cfg], f"only 1.0 MB free on the file system of {small_fs}")
    assert list(small_fs.iterdir()) == []


def test_a_read_only_directory_is_found_before_any_work(small_fs, capsys):
    text = TINY_CONFIG.replace("store: {", "store: {min_free_mb: 0, ").replace("n: 8,", "n: 2,")
    cfg = _config(small_fs.parent, text, store=small_fs / "store")
    assert main(["rss", str(cfg)]) == 0  # a store with data, then its file system turns read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True, capture_output=True, timeout=30)
    db = small_fs / "store" / "surfdiff.sqlite3"
    refused(capsys, ["rss", cfg, "--seed", "1"], f"the results store {db} is read-only")
    refused(capsys, ["train", cfg], f"the results store {db} is read-only")
    refused(capsys, ["rss", cfg, "--store", small_fs / "new"], f"cannot write to {small_fs} (for {small_fs / 'new'})")


def test_an_unreachable_mongodb_is_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    userinfo = ":".join(["user", "secret"])  # a made-up password that must never be printed
    monkeypatch.setenv("SURFDIFF_MONGO_URI", f"mongodb://{userinfo}@127.0.0.1:{port}/")
    cfg = _config(tmp_path, TINY_CONFIG.replace("store: {backend: sqlite, path: STORE}",
                                                "store: {backend: mongo, server_timeout_s: 0.2}"))
    for args in (["sample", cfg], ["query", "--config", cfg, "--models"], ["query", "--config", cfg]):
        err = refused(capsys, args, f"cannot reach MongoDB at 127.0.0.1:{port} within 0.2 s")
        assert "secret" not in err
