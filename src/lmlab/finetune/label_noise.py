"""Label-noise report (the seed's remedy for noisy labels): training examples the model confidently
disagrees with, found the confident-learning way (Northcutt et al. 2021).

A class's threshold is the model's mean confidence in that class over the examples labelled with it.
An example is flagged when the model's probability for another class reaches that class's threshold
(and the given `threshold` floor) and beats the given label. Out-of-fold probabilities (`--cv K`)
make this much sharper than in-sample ones, which a model that memorized its labels keeps close to 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmlab.utils.atomic import write_text


def _issues(probs: np.ndarray, labels: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(example, suggested class) of every suspect, most suspicious first (by p(suggested) - p(given))."""
    n, k = probs.shape
    # per-class confidence thresholds: the mean probability of class j on examples labelled j
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= np.maximum(thresholds, threshold)[None, :]
    above[np.arange(n), labels] = False
    candidates = np.where(above, probs, -1.0)
    suggested = candidates.argmax(1)
    given = probs[np.arange(n), labels]
    flagged = [i for i in range(n) if candidates[i, suggested[i]] > given[i]]
    flagged.sort(key=lambda i: given[i] - probs[i, suggested[i]])
    return [(i, int(suggested[i])) for i in flagged]


def flag_label_issues(probs: np.ndarray, labels: Sequence[int], threshold: float = 0.5) -> list[int]:
    """Indices of suspect examples, most suspicious first (by the margin p(suggested) - p(given))."""
    return [i for i, _ in _issues(np.asarray(probs, dtype=np.float64), np.asarray(labels), threshold)]


def label_noise_report(
    probs: np.ndarray,
    labels: Sequence[int],
    records: Sequence[dict[str, Any]],
    names: Sequence[str],
    out_path: str | os.PathLike,
    threshold: float = 0.5,
    in_sample: bool = False,
) -> dict[str, Any]:
    """Write flagged examples (text, given label, suggested label, probabilities) as JSONL; return a summary."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    flagged = _issues(probs, labels, threshold)
    rows = []
    for i, suggested in flagged:
        r = records[i]
        rows.append({
            "index": i,
            "text": r.get("text"),
            "given": names[labels[i]],
            "suggested": names[suggested],
            "p_given": round(float(probs[i, labels[i]]), 4),
            "p_suggested": round(float(probs[i, suggested]), 4),
            "file": r.get("_file"),
            "line": r.get("_line"),
        })  # fmt: skip
    write_text(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {
        "flagged": len(flagged),
        "of": len(labels),
        "fraction": len(flagged) / max(1, len(labels)),
        "file": str(out_path),
        "probabilities": "in-sample (run with --cv K for out-of-fold ones)" if in_sample else "out-of-fold",
    }
