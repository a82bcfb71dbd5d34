"""Progress bars refresh at the interval the command line asks for, read when the bar is made."""

from __future__ import annotations

import io

from surfdiff_core.progress import progress_bar


def _rendered(monkeypatch, interval: str | None, updates: int = 50) -> str:
    if interval is None:
        monkeypatch.delenv("SURFDIFF_PROGRESS_INTERVAL", raising=False)
    else:
        monkeypatch.setenv("SURFDIFF_PROGRESS_INTERVAL", interval)
    out = io.StringIO()
    bar = progress_bar(total=updates, desc="RSS", file=out, miniters=1)
    for i in range(updates):
        bar.set_postfix(failed=i, refresh=False)
        bar.update(1)
    bar.close()
    return out.getvalue()


def test_interval_set_after_import_is_honoured(monkeypatch):
    monkeypatch.setenv("SURFDIFF_PROGRESS_INTERVAL", "30")
    bar = progress_bar(total=1, file=io.StringIO())
    assert bar.mininterval == 30.0 and bar.maxinterval == 30.0  # nor does tqdm's monitor refresh sooner
    assert progress_bar(total=1, file=io.StringIO(), mininterval=2).mininterval == 2  # the caller's choice wins
    monkeypatch.setenv("SURFDIFF_PROGRESS_INTERVAL", "soon")
    assert progress_bar(total=1, file=io.StringIO()).mininterval == 0.1  # not a number: tqdm's default


def test_a_log_file_gets_the_first_and_last_state_within_the_interval(monkeypatch):
    text = _rendered(monkeypatch, "30")
    states = [s for s in text.split("\r") if "RSS" in s]
    assert len(states) == 2 and "0/50" in states[0] and "50/50" in states[-1] and "failed=49" in states[-1]
    assert len([s for s in _rendered(monkeypatch, "0.000001").split("\r") if "RSS" in s]) > 2
