"""The oracle registry's errors (one module, so that the registry and the calculator factories share them)."""

from __future__ import annotations

from surfdiff_core.errors import SurfdiffError


class OracleError(SurfdiffError, ValueError):
    """Unknown oracle, bad settings, or an oracle used the wrong way."""


class MissingExtraError(OracleError):
    """The optional dependency behind an oracle is not installed."""
