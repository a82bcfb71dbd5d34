"""The shared RSS arms kept beside the benchmark's history, so that a new machine (a fresh checkout) resumes them.

The arms depend on no seed or model and are the bulk of the oracle work (256 relaxations in every target cell),
but the benchmark's store is not committed (it holds every seed's training frames). So the arm documents of the
baseline study are written to `<out>/rss-arms/<study>.jsonl.xz` (without relaxation frames; the evaluation reads
energies, structures and counts), and put into the store before a run: the baseline stage finds them by id and
relaxes only what is missing. Writing is atomic; loading never replaces a document the store already holds.
"""

from __future__ import annotations

import lzma
import os
import tempfile
from pathlib import Path

from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store import ResultsStore, StructureDoc

ARMS_DIR = "rss-arms"


def arms_file(out: Path, study: str) -> Path:
    return out / ARMS_DIR / f"{study}.jsonl.xz"


def save_arms(store: ResultsStore, study: str, path: Path) -> int:
    """Every document of the baseline study `study`, in id order (a rewrite of unchanged arms is the same file)."""
    docs = list(store.find({"study": study}, sort=[("doc_id", 1)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with lzma.open(tmp, "wt", preset=9) as fh:
            for doc in docs:  # timestamps out: a rewrite of the same arms is byte-identical
                fh.write(doc.model_dump_json(exclude={"trajectory", "created_at", "updated_at"}) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from others of a shared checkout
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(docs)


def load_arms(store: ResultsStore, path: Path, study: str) -> int:
    """Put the file's documents the store lacks into it; how many were new. Documents of another study are
    refused: the file would not be this benchmark's arm."""
    if not path.is_file():
        return 0
    try:
        with lzma.open(path, "rt") as fh:
            docs = [StructureDoc.model_validate_json(line) for line in fh if line.strip()]
    except (lzma.LZMAError, EOFError, ValueError) as err:
        raise SurfdiffError(f"{path}: not a readable RSS-arm file ({type(err).__name__})") from err
    other = sorted({d.study for d in docs if d.study != study}, key=str)
    if other:
        raise SurfdiffError(f"{path}: documents of study {other[0]!r}, not of the arms' study {study!r}")
    have = store.existing_ids(d.doc_id for d in docs)
    return store.put_many([d for d in docs if d.doc_id not in have])
