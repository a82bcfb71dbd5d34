"""Guided sampling speed of the message operator built for several instruction sets, from several revisions.

    .venv/bin/python benchmarks/bench_isa.py [--rev HEAD~1 HEAD] [--march native "native -mno-avx512f" x86-64-v3]
        [--batch 64] [--steps 10] [--threads 2] [--repeats 2]

Each (revision, -march) pair is compiled once into benchmarks/.isa-builds/ (private to this checkout, never a
world-writable directory) and run in its own process: the operator is loaded from that build in place of the
installed one, then `bench_sampling.one` times guided Euler–Maruyama steps on Ag12O6/p(4×4). Pairs run in
turn, `--repeats` times, so drift in machine load hits them alike. `native -mno-avx512f` stands in for an
AVX2-only CPU (AMD EPYC Zen 2/3) on an AVX-512 host: the build where 64-byte vectors were 6× slower.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = "surfdiff_core/ml/csrc/painn_message.cpp"
BUILDS = HERE / ".isa-builds"


def build(rev: str, march: str) -> Path:
    """The operator of revision `rev` compiled with -march=`march` (and any extra flags after it)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{SOURCE}"], capture_output=True, text=True,
                            check=True).stdout
    key = hashlib.sha1(f"{source}\0{march}".encode()).hexdigest()[:12]
    out = BUILDS / key / "_painn_ops.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out.parent / "painn_message.cpp").write_text(source)
    flags = [f"-march={march.split()[0]}", *march.split()[1:]]
    cmd = ["g++", "-shared", "-fPIC", "-std=c++17", "-w", "-O3", "-ffp-contract=fast", "-fopenmp", *flags,
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_painn_ops", str(out.parent / "painn_message.cpp"), "-o", str(out),
           *(f"-L{p}" for p in library_paths()), *(f"-Wl,-rpath,{p}" for p in library_paths()),
           "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    subprocess.run(cmd, check=True)
    return out


def run_one(so: str, batch: int, steps: int, threads: int) -> dict:
    """In this process: load the operator from `so`, then time guided steps."""
    import torch  # noqa: F401 - the operator's library needs torch's symbols loaded first

    spec = importlib.util.spec_from_file_location("surfdiff_core.ml._painn_ops", so)
    ops = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(ops)  # type: ignore[union-attr]
    sys.modules["surfdiff_core.ml._painn_ops"] = ops
    sys.path[:0] = [str(HERE), str(ROOT)]
    import bench_sampling

    from surfdiff_core.ml.message_op import message_op_available

    if not message_op_available():
        raise SystemExit(f"error: the operator in {so} cannot run on this CPU")
    r = bench_sampling.one(batch, True, steps, "cpu", threads)
    return {"isa": ops.compiled_isa().strip(), "rate": r["structure_steps_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", nargs="+", default=["HEAD"])
    p.add_argument("--march", nargs="+", default=["native", "native -mno-avx512f", "x86-64-v3", "x86-64-v2"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.steps, args.threads)))
        return
    from surfdiff_core.ml.kernel_report import cpu_info, widest_isa

    model, flags = cpu_info()
    print(f"cpu: {model} ({widest_isa(flags)[0]}); batch {args.batch}, {args.steps} guided steps, "
          f"{args.threads} threads; structure-steps/s")
    pairs = [(rev, march, build(rev, march)) for rev in args.rev for march in args.march]
    rates: dict[tuple[str, str], list[float]] = {(r, m): [] for r, m, _ in pairs}
    for _ in range(args.repeats):
        for rev, march, so in pairs:
            cmd = [sys.executable, __file__, "--one", str(so), "--batch", str(args.batch), "--steps",
                   str(args.steps), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            rates[(rev, march)].append(res["rate"])
            print(f"  {rev:>10}  -march={march:<22} ({res['isa'] or 'sse2'}): {res['rate']:7.1f}", flush=True)
    print("median:")
    for (rev, march), r in rates.items():
        print(f"  {rev:>10}  -march={march:<22} {statistics.median(r):7.1f}  ({' '.join(f'{x:.1f}' for x in r)})")


if __name__ == "__main__":
    main()
