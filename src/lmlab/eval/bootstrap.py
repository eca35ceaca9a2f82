"""Bootstrap error bars: resample the examples with replacement and recompute the metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n) indices


def bootstrap_se(
    items: Sequence[T], metric: Callable[[list[T]], float] | None = None, n_boot: int = 1000, seed: int = 0
) -> float:
    """Standard error of metric(items) (default: the mean) as the spread of its value over bootstrap resamples."""
    if len(items) < 2:
        return float("nan")
    idx = _resamples(len(items), n_boot, seed)
    if metric is None:  # the mean: vectorized
        values = np.asarray(items, dtype=np.float64)[idx].mean(axis=1)
    else:
        values = np.array([metric([items[i] for i in row]) for row in idx])
    return float(values.std(ddof=1))


def paired_bootstrap(
    a: Sequence[Any],
    b: Sequence[Any],
    metric: Callable[[list[Any]], float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """metric(b) - metric(a) with a percentile confidence interval, resampling the same examples for both."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same examples: {len(a)} vs {len(b)}")
    f = metric or (lambda xs: float(np.mean(xs)))
    idx = _resamples(len(a), n_boot, seed)
    diffs = np.array([f([b[i] for i in row]) - f([a[i] for i in row]) for row in idx])
    lo, hi = np.quantile(diffs, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return {
        "a": f(list(a)),
        "b": f(list(b)),
        "diff": f(list(b)) - f(list(a)),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "confidence": confidence,
        "p_not_better": float((diffs <= 0).mean()),  # share of resamples where b does not beat a
    }
