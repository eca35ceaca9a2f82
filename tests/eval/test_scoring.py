"""Whole-set scoring: values equal the single metrics, and every metric carries a standard error."""

from __future__ import annotations

import pytest

from lmlab.eval.metrics import accuracy, bleu, chrf
from lmlab.eval.scoring import score_classification, score_generations
from tests.eval.test_metrics import HYPS, REFS


def test_score_generations_has_every_metric_with_se():
    r = score_generations(HYPS, REFS, n_boot=50)
    assert r["bleu"] == pytest.approx(bleu(HYPS, REFS)) and r["chrf"] == pytest.approx(chrf(HYPS, REFS))
    for k in ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "bleu", "chrf"):
        assert r[f"{k}_se"] >= 0, k
    assert r["bleu_se"] > 0 and len(r["records"]) == len(HYPS)


def test_score_classification():
    y_true = ["a", "b", "a", "c", "b", "a"] * 5
    y_pred = ["a", "b", "b", "c", "a", "a"] * 5
    r = score_classification(y_true, y_pred, n_boot=50)
    assert r["accuracy"] == pytest.approx(accuracy(y_true, y_pred))
    assert r["accuracy_se"] > 0 and r["macro"]["f1_se"] > 0 and set(r["per_class"]) == {"a", "b", "c"}
