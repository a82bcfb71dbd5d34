"""`surfdiff run` reports a failed flow as one line (flows/cli.py); Prefect's own reports of the same failure
(each failed task and each enclosing flow, with a traceback) are left out of the terminal. SURFDIFF_DEBUG=1
keeps them, and the command then raises with its traceback too."""

from __future__ import annotations

import logging
import os

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class FailureReports(logging.Filter):
    """Drops Prefect's reports of a run that failed: an error logged with its exception, or the final
    "Finished in state Failed(...)" line. Warnings the stages log (lost labels, a weak model) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return not (record.exc_info or str(record.msg).startswith("Finished in state "))


def quiet_failure_reports() -> None:
    """Install the filter on Prefect's run loggers, unless SURFDIFF_DEBUG asks for every traceback."""
    if os.environ.get("SURFDIFF_DEBUG"):
        return
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, FailureReports) for f in logger.filters):
            logger.addFilter(FailureReports())
