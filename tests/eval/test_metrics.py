"""Metric parity on fixed inputs: scikit-learn (P/R/F1), sacrebleu (BLEU, chrF), rouge-score (ROUGE-1/2/L)."""

from __future__ import annotations

import random

import pytest

from lmlab.eval.metrics import accuracy, bleu, chrf, exact_match, precision_recall_f1, rouge, rouge_tokenize, token_f1

HYPS = [
    "The cat sat on the mat.",
    "It's 3.14, isn't it? Yes -- about 3-4 people (maybe) came!",
    "A quick brown fox leaps over lazy dogs",
    "the the the the",
    "Completely unrelated output text here.",
    "",
    'Prices rose 2,500 dollars & fell; "quoted" text.',
]
REFS = [
    "The cat is sitting on the mat.",
    "It is 3.14, is it not? Yes, about 3-4 people came.",
    "The quick brown fox jumps over the lazy dog",
    "the cat",
    "Nothing in common at all",
    "empty hypothesis",
    'Prices rose 2,500 dollars and fell; "quoted" text.',
]


def test_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    for h, r in zip(HYPS, REFS):  # single segments hit the smoothing and brevity branches
        assert bleu([h], [r]) == pytest.approx(sacrebleu.corpus_bleu([h], [[r]]).score, abs=1e-9)
    refs2 = [r.upper() if i % 2 else r[::-1] for i, r in enumerate(REFS)]
    multi = [[a, b] for a, b in zip(REFS, refs2)]
    assert bleu(HYPS, multi) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, refs2]).score, abs=1e-9)


def test_chrf_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    for h, r in zip(HYPS, REFS):
        assert chrf([h], [r]) == pytest.approx(sacrebleu.corpus_chrf([h], [[r]]).score, abs=1e-9)
    zh_h, zh_r = ["今天天气很好", "我爱北京天安门"], ["今天天气不错", "我爱北京"]
    assert chrf(zh_h, zh_r) == pytest.approx(sacrebleu.corpus_chrf(zh_h, [zh_r]).score, abs=1e-9)


class _CharTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize(text, chinese=True)


def test_rouge_equals_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for h, r in zip(HYPS, REFS):
        ref = scorer.score(r, h)  # rouge-score takes (target, prediction)
        ours = rouge(h, r)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k]["precision"] == pytest.approx(ref[k].precision, abs=1e-12)
            assert ours[k]["recall"] == pytest.approx(ref[k].recall, abs=1e-12)
            assert ours[k]["fmeasure"] == pytest.approx(ref[k].fmeasure, abs=1e-12)


def test_rouge_chinese_is_character_level():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_CharTokenizer())
    h, r = "今天 天气很好，我们去公园", "今天天气不错，我们去公园散步"
    ref, ours = scorer.score(r, h), rouge(h, r)
    assert ours["rouge1"]["fmeasure"] > 0.5  # the default English tokenizer would see no tokens at all
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ours[k]["fmeasure"] == pytest.approx(ref[k].fmeasure, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_f1_equal_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    labels = ["pos", "neg", "neutral", "rare"]
    y_true = [rng.choice(labels[:3]) for _ in range(200)]
    y_pred = [t if rng.random() < 0.6 else rng.choice(labels) for t in y_true]  # "rare" only predicted
    ours = precision_recall_f1(y_true, y_pred)
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for avg in ("macro", "micro"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        assert [ours[avg]["precision"], ours[avg]["recall"], ours[avg]["f1"]] == pytest.approx([p, r, f])
    names = sorted(set(y_true) | set(y_pred))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=names, zero_division=0)
    for i, c in enumerate(names):
        got = ours["per_class"][c]
        assert [got["precision"], got["recall"], got["f1"], got["support"]] == pytest.approx([p[i], r[i], f[i], s[i]])


def test_exact_match_and_token_f1():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    assert token_f1("the big red barn", "a red barn") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
