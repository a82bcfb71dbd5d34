"""The `surfdiff` command line: thin argument parsing over the library's stages and the flows. This module builds
the parser and runs a command; the commands live in cli_stages.py (rss, train, relax, evaluate, baseline, run),
cli_sample.py (sample), cli_query.py (query, store migrate) and cli_models.py (models), on the helpers of
cli_common.py.

User errors: one line on stderr, exit code 2. `--store PATH` means one thing in every command: the embedded
store at PATH (the config's server or in-memory backend is swapped for the embedded default).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from flows.cli_common import OneLineErrorParser
from flows.cli_query import add_query_parser, add_store_parser
from flows.cli_stages import add_stage_parsers
from surfdiff_core.errors import SurfdiffError


def build_parser() -> argparse.ArgumentParser:
    from deploy.serve import add_serve_parser
    from flows.cli_models import add_models_parser

    p = OneLineErrorParser(prog="surfdiff", description="Generative diffusion for surface structure discovery.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    add_stage_parsers(sub)
    add_query_parser(sub)
    add_models_parser(sub)
    add_store_parser(sub)
    add_serve_parser(sub, "serve")
    return p


def _is_backend_error(exc: BaseException) -> bool:
    """An error of the store's backend (SQLite, MongoDB), its disk full or its server gone."""
    import sqlite3

    if isinstance(exc, sqlite3.Error):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        return True
    pymongo_errors = sys.modules.get("pymongo.errors")  # only if the store loaded it
    return pymongo_errors is not None and isinstance(exc, pymongo_errors.PyMongoError)


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    from surfdiff_core.config import format_validation_error
    from surfdiff_core.lifetime import Terminated, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():  # SIGTERM (Slurm's time limit, `kill`) stops as cleanly as Ctrl-C
            return int(args.func(args) or 0)
    except SurfdiffError as exc:
        print(f"surfdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a value checked by a model outside the config file: still one line
        print(f"surfdiff {args.command}: error: {format_validation_error(exc, '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from surfdiff_core.progress import close_all_bars

        close_all_bars()
        how = f"terminated ({exc.args[0]})" if isinstance(exc, Terminated) else "interrupted"
        print(f"surfdiff {args.command}: {how}; finished work is saved, rerun to resume", file=sys.stderr)
        return exc.exit_code if isinstance(exc, Terminated) else 130
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SURFDIFF_DEBUG"):
            raise
        if _is_backend_error(exc):  # the store's server or file failed mid-run: one line, no traceback
            first = (str(exc).splitlines() or [""])[0].split(", Timeout:")[0][:200]
            print(f"surfdiff {args.command}: error: the results store failed ({type(exc).__name__}): {first}",
                  file=sys.stderr)
            return 2
        print(f"surfdiff {args.command}: error: {type(exc).__name__}: {exc} (SURFDIFF_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
