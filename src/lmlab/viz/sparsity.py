"""Sparsity against perplexity: one line per pruning method, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.viz.figure import pyplot, save_png


def plot_sparsity_curve(curves: dict[str, list[tuple[float, float]]], path: str | os.PathLike,
                        dense: float | None = None, title: str = "") -> Path:  # fmt: skip
    """Plot {method: [(sparsity, perplexity), ...]} (log-scale perplexity), with the dense model as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, points in curves.items():
        points = sorted(points)
        ax.plot([s for s, _ in points], [p for _, p in points], "o-", label=method)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the block linears")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity after one-shot pruning")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
