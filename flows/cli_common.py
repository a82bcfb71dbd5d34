"""What every part of the `surfdiff` command line shares (flows/cli.py and the modules it builds on): the parser
class, the --store help, loading the study config once and checking numeric options.

User errors: one line on stderr, exit code 2. `--store PATH` means one thing in every command: the embedded
store at PATH (the config's server or in-memory backend is swapped for the embedded default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from surfdiff_core.errors import ConfigError

STORE_HELP = "the embedded store at PATH (default: store of the config)"


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_study(config: str, store: str | None = None, *, one_process: bool = False):
    """The config, parsed once for the whole command, with --store applied."""
    from surfdiff_core.config import load_config
    from surfdiff_core.stages.common import with_store_path

    if store and Path(store).exists() and not Path(store).is_dir():
        raise ConfigError(f"--store {store} is a file: give the store's directory (or a new path)")
    cfg = with_store_path(load_config(config), store)
    if cfg.store.backend == "memory" and not one_process:
        raise ConfigError("store.backend 'memory' keeps nothing between commands: use `surfdiff run`, or pass "
                          "--store PATH for the embedded store")
    return cfg


def check_at_least(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum} (got {value})")
