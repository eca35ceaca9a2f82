"""Progress bars that suit where the output goes: a live bar (rate, ETA) in a terminal, and in a log
file or CI one plain line per interval instead of thousands of carriage-return redraws."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between lines when the output is not a terminal


class _Lines:
    """A file for tqdm that turns each redraw into one line (no '\\r', no cursor moves)."""

    def __init__(self, f: TextIO) -> None:
        self.f = f

    def write(self, s: str) -> None:
        s = s.replace("\r", "").replace("\x1b[A", "").strip("\n")
        if s.strip():
            self.f.write(s.strip() + "\n")

    def flush(self) -> None:
        self.f.flush()


def is_terminal(f: TextIO | None = None) -> bool:
    f = f or sys.stderr
    return hasattr(f, "isatty") and f.isatty()


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on stderr: live in a terminal, else a line every LOG_INTERVAL_S seconds
    ($LMLAB_PROGRESS_INTERVAL overrides), plus the first and the last."""
    if is_terminal():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, disable=disable, **kwargs)
    interval = float(os.environ.get("LMLAB_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    kwargs["leave"] = True  # in a log, the last line is the summary: keep it
    return tqdm(
        iterable, disable=disable, file=_Lines(sys.stderr), mininterval=interval, maxinterval=interval,
        ncols=100, ascii=True, **kwargs,
    )  # fmt: skip


def say(text: str) -> None:
    """A line that does not break a live bar (tqdm.write)."""
    tqdm.write(text, file=sys.stdout)
