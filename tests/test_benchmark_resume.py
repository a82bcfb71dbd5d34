"""benchmarks/discovery/resume.py: an unfinished seed's store and checkpoints survive pack → unpack exactly."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

from surfdiff_core.config import StoreConfig
from surfdiff_core.store import open_store
from surfdiff_core.store.models import ModelRecord, ModelRegistry, file_sha256, verify_checkpoint
from tests.test_evaluate import N_SUB, base_slab, make_doc

ROOT = Path(__file__).resolve().parents[1]


def _resume_module():
    spec = importlib.util.spec_from_file_location("bench_resume", ROOT / "benchmarks" / "discovery" / "resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed_store(out: Path, seed: int) -> tuple[StoreConfig, Path]:
    cfg = StoreConfig(backend="sqlite", path=str(out / "stores" / f"s{seed}"))
    with open_store(cfg) as store:
        store.put_many([make_doc(base_slab(), N_SUB, energy=-float(i), doc_id=f"rss-{seed}-{i}") for i in range(3)])
    checkpoint = out / "stores" / "checkpoints" / f"model-{seed}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(bytes(range(256)) * 4)
    checkpoint.with_name(f"model-{seed}-last.pt").write_bytes(b"resume state")  # without it: trained again
    with ModelRegistry(cfg) as registry:
        registry.record(ModelRecord(model_id=f"model-{seed}", checkpoint=str(checkpoint),
                                    sha256=file_sha256(checkpoint), system_id="sys"))
    (out / "stores" / "checkpoints" / "other-seed.pt").write_bytes(b"not this seed's")
    return cfg, checkpoint


def test_pack_unpack_round_trip(tmp_path):
    resume = _resume_module()
    cfg, checkpoint = _seed_store(tmp_path, 202)
    original = checkpoint.read_bytes()
    (archive,) = resume.pack(tmp_path, [202])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert sorted(names) == ["stores/checkpoints/model-202-last.pt", "stores/checkpoints/model-202.pt",
                             "stores/s202/surfdiff.sqlite3"]  # only its own models

    for path in sorted((tmp_path / "stores").rglob("*"), reverse=True):  # a fresh checkout: stores are gone
        path.unlink() if path.is_file() else path.rmdir()
    resume.unpack(tmp_path)
    with open_store(cfg) as store:
        assert sorted(d.doc_id for d in store.find({})) == [f"rss-202-{i}" for i in range(3)]
    assert checkpoint.read_bytes() == original
    assert checkpoint.with_name("model-202-last.pt").read_bytes() == b"resume state"
    with ModelRegistry(cfg) as registry:
        verify_checkpoint(registry.get("model-202"))  # the registry's hash matches the restored file

    # a second unpack keeps what is there (a resumed run may have moved on since)
    with open_store(cfg) as store:
        store.put(make_doc(base_slab(), N_SUB, energy=-9.0, doc_id="rss-202-new"))
    resume.unpack(tmp_path)
    with open_store(cfg) as store:
        assert store.count({}) == 4


def test_unpack_refuses_members_outside_the_folder(tmp_path):
    resume = _resume_module()
    (tmp_path / "resume").mkdir()
    with tarfile.open(tmp_path / "resume" / "s1.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.OutsideDestinationError):
        resume.unpack(tmp_path)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_pack_names_a_missing_store(tmp_path):
    resume = _resume_module()
    with pytest.raises(SystemExit, match="no store for seed 7"):
        resume.pack(tmp_path, [7])
