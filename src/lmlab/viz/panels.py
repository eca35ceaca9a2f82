"""A grid of small line plots, one per metric of a metrics log (alignment: reward, KL, margins, pass rate)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lmlab.viz.figure import pyplot, save_png


def plot_metric_panels(records: list[dict], keys: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per key present in the records (value against step); keys never logged are skipped."""
    plt = pyplot()
    present = [k for k in keys if any(k in r for r in records)] or ["loss"]
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), "-" if len(points) > 12 else "o-")
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)
