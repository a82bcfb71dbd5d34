"""Carry an unfinished benchmark seed from one machine (or session) to the next.

A CHGNet seed at the criterion's size takes longer than one session on 2 cores, and the stores under
`<out>/stores/` are git-ignored. `pack` writes one archive per seed: a consistent snapshot of the seed's SQLite
store (the backup API, safe while a run is writing) and the checkpoints its model registry names, with the
trainer's resume state beside each. `unpack` restores them, after which the same `run.py` command resumes where
it stopped (document ids are deterministic; finished structures and trained models are skipped).

    .venv/bin/python benchmarks/discovery/resume.py pack --out benchmarks/discovery/chgnet-n256 --seeds 202
    .venv/bin/python benchmarks/discovery/resume.py unpack --out benchmarks/discovery/chgnet-n256
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

STORE_FILE = "surfdiff.sqlite3"


def _registry_checkpoints(db: Path, *, resume_state: bool = True) -> list[Path]:
    """Checkpoint files named by the model registry held in the store file `db`, each with its `-last`
    sibling when `resume_state`: the trainer's resume state, without which a rerun trains the same model again."""
    import orjson

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        paths = []
        for table in (t for t in tables if t.endswith("_models")):
            for (doc,) in conn.execute(f'select doc from "{table}"'):  # noqa: S608 - names from sqlite_master
                checkpoint = orjson.loads(doc).get("checkpoint")
                if checkpoint:
                    path = Path(checkpoint)
                    paths.append(path)
                    if resume_state:
                        paths.append(path.with_name(f"{path.stem}-last{path.suffix}"))
    return paths


def pack(out: Path, seeds: list[int]) -> list[Path]:
    stores = out / "stores"
    archives = []
    for seed in seeds:
        db = stores / f"s{seed}" / STORE_FILE
        if not db.is_file():
            raise SystemExit(f"error: no store for seed {seed} at {db}")
        (out / "resume").mkdir(exist_ok=True)
        target = out / "resume" / f"s{seed}.tar.xz"
        with tempfile.TemporaryDirectory() as tmp:
            snapshot = Path(tmp) / STORE_FILE
            with sqlite3.connect(db) as src, sqlite3.connect(snapshot) as dst:
                src.backup(dst)
            checkpoints = [p for p in _registry_checkpoints(snapshot) if p.is_file()]
            partial = target.with_suffix(".partial")
            with tarfile.open(partial, "w:xz") as tar:
                tar.add(snapshot, arcname=f"stores/s{seed}/{STORE_FILE}")
                for path in checkpoints:
                    tar.add(path, arcname=f"stores/checkpoints/{path.name}")
            os.replace(partial, target)  # whole or not at all
        print(f"packed seed {seed}: {target} ({target.stat().st_size / 1e6:.1f} MB, {len(checkpoints)} checkpoints)")
        archives.append(target)
    return archives


def unpack(out: Path) -> None:
    archives = sorted((out / "resume").glob("s*.tar.xz"))
    if not archives:
        raise SystemExit(f"error: no archives in {out / 'resume'}")
    checkpoints = (out / "stores" / "checkpoints").resolve()
    stores = [out / "stores" / a.name.removesuffix(".tar.xz") for a in archives]
    for archive, store in zip(archives, stores, strict=True):
        if (store / STORE_FILE).exists():
            print(f"kept {store}: a store is already there (delete it to restore {archive.name})")
            continue
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(out, filter="data")  # refuses absolute paths, '..' and links out of `out`
        print(f"restored {store} from {archive.name}")
    # The registry names checkpoints by absolute path: they must be where it says (the same checkout path).
    missing = [p for store in stores for p in _registry_checkpoints(store / STORE_FILE, resume_state=False)
               if not p.is_file()]
    if missing:
        print(f"warning: {len(missing)} checkpoints are not where the registry says (e.g. {missing[0]}); "
              f"they were restored to {checkpoints}: run from the same checkout path, or retrain", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("--out", required=True, help="the benchmark folder (run.py --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="seeds to pack")
    args = p.parse_args()
    out = Path(args.out)
    if args.action == "pack":
        if not args.seeds:
            sys.exit("error: pack needs --seeds")
        pack(out, args.seeds)
    else:
        unpack(out)


if __name__ == "__main__":
    main()
