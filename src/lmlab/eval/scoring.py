"""Score a whole set at once: every text or classification metric with its bootstrap standard error."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from lmlab.eval.bootstrap import bootstrap_se
from lmlab.eval.metrics import accuracy, bleu, chrf, exact_match, precision_recall_f1, rouge, token_f1


def score_generations(predictions: Sequence[str], references: Sequence[str], n_boot: int = 200) -> dict[str, Any]:
    """Exact match, token F1, ROUGE-1/2/L F (means over pairs) and corpus BLEU and chrF, each with a bootstrap SE."""
    pairs = list(zip(predictions, references))
    per = [
        {"exact_match": exact_match(p, r), "token_f1": token_f1(p, r)}
        | {k: v["fmeasure"] for k, v in rouge(p, r).items()}
        for p, r in pairs
    ]
    out: dict[str, Any] = {"n": len(pairs)}
    for key in per[0] if per else []:
        values = [x[key] for x in per]
        out[key], out[f"{key}_se"] = sum(values) / len(values), bootstrap_se(values)
    for name, fn in (("bleu", bleu), ("chrf", chrf)):
        corpus = lambda ps, fn=fn: fn([p for p, _ in ps], [r for _, r in ps])
        out[name], out[f"{name}_se"] = corpus(pairs), bootstrap_se(pairs, corpus, n_boot=n_boot)
    out["records"] = [{"prediction": p, "reference": r, **x} for (p, r), x in zip(pairs, per)]
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
