"""Progress: a live bar in a terminal; in a log, one plain line per interval (no carriage-return frames)."""

from __future__ import annotations

import io

from lmlab.utils import progress as progress_mod
from lmlab.utils.progress import progress_bar


def test_redirected_output_gets_plain_lines(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress_mod.sys, "stderr", err)
    monkeypatch.setenv("LMLAB_PROGRESS_INTERVAL", "3600")  # nothing between the first and last line
    for _ in progress_bar(range(5000), desc="work"):
        pass
    text = err.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("work: 100%") and "5000/5000" in lines[-1]


def test_interval_lines_show_rate_and_eta(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(progress_mod.sys, "stderr", err)
    monkeypatch.setenv("LMLAB_PROGRESS_INTERVAL", "0")
    bar = progress_bar(total=4, desc="steps", unit="step")
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = err.getvalue().splitlines()
    assert len(lines) >= 4 and all("\r" not in line for line in lines)
    assert "step/s" in lines[-1] and "<" in lines[2]  # rate, and elapsed<remaining
