"""Classification diagnostics: confusion matrix and calibration (expected calibration error), with their plots."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any


def confusion_matrix(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> tuple[list[list[int]], list[Hashable]]:
    """Counts[i][j] of true label i predicted as j (rows true, as scikit-learn), and the label order."""
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred), key=str)
    index = {c: i for i, c in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            m[index[t]][index[p]] += 1
    return m, labels


def choice_probabilities(loglikelihoods: Sequence[float]) -> list[float]:
    """Softmax over the choices' log-likelihoods: the model's probability for each choice."""
    top = max(loglikelihoods)
    e = [math.exp(x - top) for x in loglikelihoods]
    return [x / sum(e) for x in e]


def calibration_bins(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each (bin i holds (i/n, (i+1)/n])."""
    bins = [{"count": 0, "confidence": 0.0, "accuracy": 0.0} for _ in range(n_bins)]
    for c, ok in zip(confidence, correct):
        b = bins[min(n_bins - 1, max(0, math.ceil(c * n_bins) - 1))]
        b["count"] += 1
        b["confidence"] += c
        b["accuracy"] += ok
    for b in bins:
        if b["count"]:
            b["confidence"] /= b["count"]
            b["accuracy"] /= b["count"]
    return bins


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 10) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    n = len(confidence)
    bins = calibration_bins(confidence, correct, n_bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins) if n else 0.0


def plot_confusion(matrix: list[list[int]], labels: Sequence[Any], path: str | os.PathLike, title: str = "") -> Path:
    """Confusion matrix as a PNG (rows: true label, columns: predicted)."""
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.grid(False)  # the shared style's grid would cross the cells
    ax.set_xticks(range(len(labels)), [str(x) for x in labels])
    ax.set_yticks(range(len(labels)), [str(x) for x in labels])
    top = max(max(r) for r in matrix) if matrix else 0
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return save_png(fig, path)


def plot_reliability(bins: list[dict[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal of perfect calibration."""
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    n = len(bins)
    centers = [(i + 0.5) / n for i in range(n)]
    ax.bar(centers, [b["accuracy"] for b in bins], width=1 / n, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)
