"""Score a whole set at once: every text or classification metric with its bootstrap standard error."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from lmlab.eval.bootstrap import bootstrap_se, paired_bootstrap
from lmlab.eval.metrics import (
    accuracy,
    bleu_from_stats,
    bleu_stats,
    chrf_from_stats,
    chrf_stats,
    exact_match,
    precision_recall_f1,
    rouge,
    token_f1,
)
from lmlab.eval.tasks import GENERATION_METRICS

# corpus-level metrics: per-example statistics, summed over the set, then one formula (sacrebleu's definition)
CORPUS_METRICS: dict[str, tuple[Callable[[str, list[str]], list[int]], Callable[[Sequence[float]], float]]] = {
    "bleu": (bleu_stats, bleu_from_stats),
    "chrf": (chrf_stats, chrf_from_stats),
}
_PAIR_METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1}


def _refs(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


def example_scores(prediction: str, references: str | Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """One example's scores: sentence metrics take the best reference; bleu/chrf are that example alone as a corpus."""
    refs, out = _refs(references), {}
    rouges = [rouge(prediction, r) for r in refs] if any(m.startswith("rouge") for m in metrics) else []
    for m in metrics:
        if m in _PAIR_METRICS:
            out[m] = max(_PAIR_METRICS[m](prediction, r) for r in refs)
        elif m in CORPUS_METRICS:
            stats, formula = CORPUS_METRICS[m]
            out[m] = formula(stats(prediction, refs))
        elif m.startswith("rouge"):
            out[m] = max(s[m]["fmeasure"] for s in rouges)  # rouge-score's multi-reference rule: the best F
        else:
            raise ValueError(f"unknown metric {m!r}; known: {', '.join(GENERATION_METRICS)}")
    return out


def corpus_metric(name: str) -> Callable[[list[list[int]]], float]:
    """A function of a list of per-example statistics rows giving the corpus value (what bootstraps resample)."""
    formula = CORPUS_METRICS[name][1]
    return lambda rows: formula(np.sum(np.asarray(rows, dtype=np.int64), axis=0)) if rows else 0.0


def corpus_stats(name: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[int]]:
    """Per-example statistics rows of a corpus metric (bleu or chrf)."""
    stats = CORPUS_METRICS[name][0]
    return [stats(p, _refs(r)) for p, r in zip(predictions, references)]


def score_generations(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str] = GENERATION_METRICS,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Sentence metrics averaged, bleu/chrf at corpus level, each with a bootstrap SE; per-example records.

    References may be one string or a list per example. The SE of a corpus metric resamples examples and recomputes
    it from their summed statistics, which is the same as rescoring the resampled corpus.
    """
    refs = [_refs(r) for r in references]
    per = [example_scores(p, r, metrics) for p, r in zip(predictions, refs)]
    out: dict[str, Any] = {"n": len(per), "metrics": list(metrics)}
    for m in metrics:
        if m in CORPUS_METRICS:
            rows = corpus_stats(m, predictions, refs)
            out[m], out[f"{m}_se"] = corpus_metric(m)(rows), bootstrap_se(rows, corpus_metric(m), n_boot=n_boot)
        else:
            values = [x[m] for x in per]
            out[m] = sum(values) / len(values) if values else 0.0
            out[f"{m}_se"] = bootstrap_se(values, n_boot=n_boot)
    out["records"] = [{"prediction": p, "references": r, **x} for p, r, x in zip(predictions, refs, per)]
    return out


def compare_generations(
    a: list[dict[str, Any]], b: list[dict[str, Any]], metrics: Sequence[str], n_boot: int = 1000
) -> dict[str, dict[str, float]]:
    """Per metric, B minus A on the same examples (records with prediction and references), paired bootstrap."""
    out = {}
    for m in metrics:
        if m in CORPUS_METRICS:  # resample examples jointly and recompute the corpus value of each side
            xa = corpus_stats(m, [r["prediction"] for r in a], [r["references"] for r in a])
            xb = corpus_stats(m, [r["prediction"] for r in b], [r["references"] for r in b])
            out[m] = paired_bootstrap(xa, xb, corpus_metric(m), n_boot=n_boot)
        else:
            out[m] = paired_bootstrap([r[m] for r in a], [r[m] for r in b], n_boot=n_boot)
    return out


def score_classification(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], n_boot: int = 200) -> dict[str, Any]:
    """Accuracy, macro and micro P/R/F1 and per-class scores, with bootstrap SEs for accuracy and the F1s."""
    pairs = list(zip(y_true, y_pred))
    prf = precision_recall_f1(y_true, y_pred)
    out: dict[str, Any] = {"n": len(pairs), "accuracy": accuracy(y_true, y_pred), **prf}
    out["accuracy_se"] = bootstrap_se([float(t == p) for t, p in pairs])
    for avg in ("macro", "micro"):
        f1 = lambda ps, avg=avg: precision_recall_f1([t for t, _ in ps], [p for _, p in ps])[avg]["f1"]
        out[avg]["f1_se"] = bootstrap_se(pairs, f1, n_boot=n_boot)
    return out
