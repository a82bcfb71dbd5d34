"""The compiled message operator takes its fast path on the host the tests run on, and its vector kernels are
exact at every vector count (the AVX-512, AVX2 and SSE builds split the radial features differently)."""

from __future__ import annotations

import os

import pytest
import torch
from test_painn import _eager_messages, _op_inputs, needs_op

from surfdiff_core.ml import message_op
from surfdiff_core.ml.kernel_report import describe, kernel_report, slow_path_reasons, widest_isa

FAST = {"cpu": "x", "cpu_isa": "avx2", "torch_threads": 2, "path": "operator", "eager_reason": None,
        "compiled_isa": "avx2", "vector_bytes": 32, "openmp_team": 2}


@needs_op
@pytest.mark.skipif(os.environ.get("SURFDIFF_NO_KERNELS", "") not in ("", "0"), reason="eager path asked for")
def test_operator_takes_the_fast_path_on_this_host() -> None:
    """Fails when the operator silently runs slow here: the eager fallback, a build for less than this CPU has,
    vectors wider or narrower than its registers (6x slower on AVX2-only AMD EPYC), or a single-thread build."""
    report = kernel_report()
    assert slow_path_reasons(report) == [], describe(report)
    assert report["path"] == "operator"
    assert report["vector_bytes"] == {"avx512f": 64, "avx2": 32, "avx": 32}.get(report["compiled_isa"], 16)


@pytest.mark.parametrize(("change", "expected"), [
    ({}, None),
    ({"vector_bytes": 64}, "64-byte vectors on a avx2 build"),  # the AMD EPYC slowdown of issue 28
    ({"cpu_isa": "avx512f"}, "built for avx2 on a CPU with avx512f"),
    ({"compiled_isa": "sse2", "vector_bytes": 16}, "built for sse2 on a CPU with avx2"),
    ({"openmp_team": 1}, "runs on 1 of 2 threads"),
    ({"vector_bytes": None}, "before its vector width was chosen"),
    ({"path": "eager", "eager_reason": "disabled by SURFDIFF_NO_KERNELS"}, "eager PyTorch path"),
])
def test_slow_path_reasons_name_each_cause(change: dict, expected: str | None) -> None:
    reasons = slow_path_reasons({**FAST, **change})
    if expected is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and expected in reasons[0], reasons


def test_widest_isa() -> None:
    assert widest_isa({"sse2", "avx", "avx2", "fma", "avx512f"}) == ("avx512f", 64)
    assert widest_isa({"sse2", "avx", "avx2"}) == ("avx2", 32)
    assert widest_isa({"sse2", "sse4_2"}) == ("sse2", 16)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_k", [8, 30, 40, 70])
def test_op_exact_at_every_vector_count(dtype: torch.dtype, n_k: int) -> None:
    """Radial feature counts that give 1 to 8 vectors per filter gradient (and the generic loop beyond) on
    whatever width this build has, at the paper's 64 features: forward and every gradient against the
    materialised reference."""
    inputs = [t.detach().to(dtype).requires_grad_() if t is not None and t.is_floating_point() else t
              for t in _op_inputs(True, n=30, nf=64, n_k=n_k, n_pairs=200, seed=n_k)]
    out = message_op.painn_messages(*inputs)
    ref = _eager_messages(*inputs)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {}
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    cotangents = [torch.randn_like(t) for t in ref]
    wrt = [t for t in inputs[:5] if t is not None]
    for a, b in zip(torch.autograd.grad(out, wrt, cotangents), torch.autograd.grad(ref, wrt, cotangents),
                    strict=True):
        torch.testing.assert_close(a, b, **tol)
