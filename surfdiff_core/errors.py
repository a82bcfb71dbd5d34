"""One exception family for problems a user can fix: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class SurfdiffError(Exception):
    """A user-facing error (bad input, missing dependency, unusable data)."""


class ConfigError(SurfdiffError, ValueError):
    """The configuration (YAML or command-line options) is invalid."""
