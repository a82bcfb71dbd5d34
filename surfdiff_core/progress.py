"""Progress bars: tqdm, refreshed at most every SURFDIFF_PROGRESS_INTERVAL seconds when that is set (a log file
from nohup or a batch job gets a line every so often instead of one per step). Read per bar, not at import, so
a command line can set it after the library is loaded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    try:
        interval = float(os.environ.get("SURFDIFF_PROGRESS_INTERVAL", ""))
    except ValueError:  # unset or not a number: tqdm's own refresh rate
        interval = None
    if interval is not None and interval > 0:
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))  # tqdm's monitor would force 10 s
    return tqdm(iterable, **kwargs)


def close_all_bars() -> None:
    """Close the bars an interrupted stage left open, so that they are not redrawn after the command's last line
    (tqdm redraws a bar when it is garbage-collected)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
