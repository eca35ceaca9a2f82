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
from pathlib import Path
from typing import Any

import numpy as np


def flag_label_issues(probs: np.ndarray, labels: Sequence[int], threshold: float = 0.5) -> list[int]:
    """Indices of suspect examples, most suspicious first (by the margin p(suggested) - p(given))."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    n, k = probs.shape
    # per-class confidence thresholds: the mean probability of class j on examples labelled j
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= np.maximum(thresholds, threshold)[None, :]
    above[np.arange(n), labels] = False
    candidates = np.where(above, probs, -1.0)
    suggested = candidates.argmax(1)
    given = probs[np.arange(n), labels]
    flagged = [i for i in range(n) if candidates[i, suggested[i]] > given[i]]
    margin = {i: probs[i, suggested[i]] - given[i] for i in flagged}
    return sorted(flagged, key=lambda i: -margin[i])


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
    probs = np.asarray(probs, dtype=np.float64)
    flagged = flag_label_issues(probs, labels, threshold)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in flagged:
            r = records[i]
            suggested = int(np.argmax(np.where(np.arange(probs.shape[1]) == labels[i], -1, probs[i])))
            row = {
                "index": i,
                "text": r.get("text"),
                "given": names[labels[i]],
                "suggested": names[suggested],
                "p_given": round(float(probs[i, labels[i]]), 4),
                "p_suggested": round(float(probs[i, suggested]), 4),
                "file": r.get("_file"),
                "line": r.get("_line"),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return {
        "flagged": len(flagged),
        "of": len(labels),
        "fraction": len(flagged) / max(1, len(labels)),
        "file": str(out_path),
        "probabilities": "in-sample (run with --cv K for out-of-fold ones)" if in_sample else "out-of-fold",
    }
