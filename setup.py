"""Builds the compiled PaiNN message operator `surfdiff_core.ml._painn_ops`; metadata lives in pyproject.toml.

The build needs torch importable (install with `pip install --no-build-isolation`, as scripts/setup.sh does)
and a C++ compiler. Without either the package still installs and surfdiff warns once at run time that it
uses the slower eager PyTorch path. Environment:
    SURFDIFF_NO_BUILD_EXT=1      skip the extension
    SURFDIFF_PORTABLE_BUILD=1    no -march=native (for wheels or environments copied to other CPUs)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup

EXTENSION = "surfdiff_core.ml._painn_ops"
SOURCES = ["surfdiff_core/ml/csrc/painn_message.cpp"]


def _warn(message: str) -> None:
    print(f"WARNING: {EXTENSION} not built ({message}); surfdiff will use the eager PyTorch path", file=sys.stderr)


def _extension_kwargs() -> dict[str, Any]:
    if os.environ.get("SURFDIFF_NO_BUILD_EXT", "") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable at build time: install with --no-build-isolation")
        return {}

    class GuardedBuildExtension(BuildExtension):
        """A failing compile (no compiler, unsupported flags) must not fail the install of the rest."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure leaves the eager fallback
                _warn(f"{type(err).__name__}: {err}")

    # -fopenmp: at::parallel_for is an `omp parallel` region compiled into this extension; without the flag
    # it silently runs on one thread. The OpenMP runtime resolves to the libgomp torch has already loaded.
    flags = ["-O3", "-ffp-contract=fast", "-fopenmp"]  # -ffp-contract: ISO C++ would otherwise forbid FMA
    if os.environ.get("SURFDIFF_PORTABLE_BUILD", "") in ("", "0"):
        flags.append("-march=native")  # built where it runs, like any local install; see compiled_isa()
    ext = CppExtension(EXTENSION, SOURCES, extra_compile_args=flags, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": GuardedBuildExtension}}


setup(**_extension_kwargs())
