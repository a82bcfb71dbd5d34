"""Which path the PaiNN message passing takes on this host, and why it would be slow.

The compiled operator is 15-20x the eager path only when it is built for the CPU it runs on: vectors as wide
as the CPU's registers (a GCC vector type wider than the hardware's is lowered piecewise: 64-byte vectors ran
6x slower on AVX2-only AMD EPYC hosts), the widest instruction set the CPU has (a portable build falls back
to SSE), and its OpenMP regions on every intra-op thread. `slow_path_reasons` names each of these that does
not hold; benchmarks print `kernel_report()` beside their numbers and a test fails on any reason.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# the vector instruction sets the build can use, widest first, with their register width in bytes
VECTOR_ISAS: tuple[tuple[str, int], ...] = (("avx512f", 64), ("avx2", 32), ("avx", 32))
BASELINE_VECTOR_BYTES = 16  # SSE2, every x86-64


def cpu_info() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this CPU from /proc/cpuinfo; ('unknown', set()) elsewhere."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def widest_isa(flags: set[str]) -> tuple[str, int]:
    """(name, register bytes) of the widest vector instruction set in `flags`."""
    return next(((isa, width) for isa, width in VECTOR_ISAS if isa in flags), ("sse2", BASELINE_VECTOR_BYTES))


def kernel_report() -> dict[str, Any]:
    """This host and the operator build: CPU, instruction sets, vector width, threads, and the path taken."""
    from surfdiff_core.ml import message_op

    model, flags = cpu_info()
    ops = message_op._painn_ops
    report: dict[str, Any] = {
        "cpu": model, "cpu_isa": widest_isa(flags)[0], "torch_threads": torch.get_num_threads(),
        "path": "operator" if message_op.message_op_available() else "eager",
        "eager_reason": message_op.message_op_unavailable_reason(),
        "compiled_isa": None, "vector_bytes": None, "openmp_team": None,
    }
    if ops is not None:
        compiled = set(ops.compiled_isa().split())
        width = getattr(ops, "vector_bytes", None)  # None: a build from before the width was chosen per ISA
        report.update(compiled_isa=widest_isa(compiled)[0], vector_bytes=None if width is None else int(width()),
                      openmp_team=int(ops.parallel_team_size()))
    return report


def slow_path_reasons(report: dict[str, Any]) -> list[str]:
    """Why message passing runs slower than it could on this host: one line per cause, [] when on the fast path."""
    if report["path"] != "operator":
        return [f"eager PyTorch path ({report['eager_reason']}): 15-20x slower than the compiled operator"]
    reasons = []
    widths = dict(VECTOR_ISAS)
    cpu_width = widths.get(report["cpu_isa"], BASELINE_VECTOR_BYTES)
    built_width = widths.get(report["compiled_isa"], BASELINE_VECTOR_BYTES)
    if built_width < cpu_width:
        reasons.append(f"operator built for {report['compiled_isa']} on a CPU with {report['cpu_isa']}: reinstall "
                       "without SURFDIFF_PORTABLE_BUILD to build it for this CPU")
    if report["vector_bytes"] is None:
        reasons.append("operator built before its vector width was chosen per instruction set: reinstall "
                       "(scripts/setup.sh)")
    elif report["vector_bytes"] != built_width:
        reasons.append(f"operator kernels use {report['vector_bytes']}-byte vectors on a {report['compiled_isa']} "
                       f"build ({built_width}-byte registers)")
    if report["openmp_team"] is not None and report["openmp_team"] < report["torch_threads"]:
        reasons.append(f"operator runs on {report['openmp_team']} of {report['torch_threads']} threads (built "
                       "without OpenMP?)")
    return reasons


def describe(report: dict[str, Any]) -> str:
    """One line for benchmark output."""
    if report["path"] != "operator":
        build = f"eager path ({report['eager_reason']})"
    else:
        build = (f"operator built for {report['compiled_isa']} ({report['vector_bytes']}-byte vectors), "
                 f"OpenMP team {report['openmp_team']}")
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ)
    return (f"cpu: {report['cpu']} ({report['cpu_isa']}); torch threads {report['torch_threads']}; {build}"
            + (f"; {env}" if env else ""))
