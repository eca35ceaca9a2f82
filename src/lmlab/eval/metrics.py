"""Metrics: accuracy, precision/recall/F1, exact match, token F1, BLEU and chrF (sacrebleu's), ROUGE (rouge-score's)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to the label."""
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true) if len(y_true) else 0.0


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0  # scikit-learn's zero_division: 0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def precision_recall_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> dict[str, Any]:
    """Per-class, macro and micro precision, recall and F1 over the labels seen in y_true or y_pred (as scikit-learn)."""
    labels = sorted(set(y_true) | set(y_pred), key=str)
    per_class, tps, fps, fns = {}, 0, 0, 0
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        p, r, f = _prf(tp, fp, fn)
        per_class[str(c)] = {"precision": p, "recall": r, "f1": f, "support": tp + fn}
        tps, fps, fns = tps + tp, fps + fp, fns + fn
    n = max(1, len(labels))
    macro = {k: sum(v[k] for v in per_class.values()) / n for k in ("precision", "recall", "f1")}
    micro = dict(zip(("precision", "recall", "f1"), _prf(tps, fps, fns)))
    return {"per_class": per_class, "macro": macro, "micro": micro}


def _squad_normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the SQuAD-normalized strings (lowercase, no punctuation or articles) are equal."""
    return float(_squad_normalize(prediction) == _squad_normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalized prediction and reference."""
    p, r = _squad_normalize(prediction).split(), _squad_normalize(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


# --- BLEU: sacrebleu's defaults (13a tokenizer, exp smoothing, 4-grams, closest reference length) ---
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> str:
    """The mteval-v13a tokenization used by WMT and sacrebleu's default."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_ref_lists(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu_stats(hypothesis: str, references: str | Sequence[str], order: int = 4) -> list[int]:
    """One segment's BLEU statistics: [correct n-grams (order), total n-grams (order), hyp length, ref length]."""
    refs = [references] if isinstance(references, str) else list(references)
    h = tokenize_13a(hypothesis).split()
    rs = [tokenize_13a(r).split() for r in refs]
    correct, total = [0] * order, [0] * order
    for n in range(1, order + 1):
        ref_max: Counter = Counter()
        for r in rs:
            ref_max |= _ngrams(r, n)  # clip by the largest count in any reference
        hyp_ng = _ngrams(h, n)
        correct[n - 1] = sum(min(c, ref_max[g]) for g, c in hyp_ng.items())
        total[n - 1] = sum(hyp_ng.values())
    ref_len = min((abs(len(r) - len(h)), len(r)) for r in rs)[1] if rs else 0  # closest length, shorter on ties
    return correct + total + [len(h), ref_len]


def bleu_from_stats(stats: Sequence[float], order: int = 4) -> float:
    """Corpus BLEU (0-100) from statistics summed over segments (sacrebleu's exp smoothing and brevity penalty)."""
    correct, total = list(stats[:order]), list(stats[order : 2 * order])
    sys_len, ref_len = stats[2 * order], stats[2 * order + 1]
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    if not any(correct):
        return 0.0
    precisions, smooth = [0.0] * order, 1.0
    for n in range(order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2  # 'exp' smoothing: halve a zero precision's stand-in at each order
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions]
    return bp * math.exp(sum(logs) / order)


def _sum_stats(rows: Sequence[Sequence[int]], width: int) -> list[int]:
    total = [0] * width
    for row in rows:
        total = [a + b for a, b in zip(total, row)]
    return total


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], order: int = 4) -> float:
    """Corpus BLEU (0-100) equal to sacrebleu.corpus_bleu with its defaults; references: one string or a list each."""
    rows = [bleu_stats(h, r, order) for h, r in zip(hypotheses, _as_ref_lists(references))]
    return bleu_from_stats(_sum_stats(rows, 2 * order + 2), order)


# --- chrF: sacrebleu's defaults (character 6-grams, whitespace removed, beta 2, effective-order averaging) ---
def _char_ngrams(line: str, order: int) -> list[Counter]:
    line = "".join(line.split())
    return [Counter(line[i : i + n] for i in range(len(line) - n + 1)) for n in range(1, order + 1)]


def _chrf_from_stats(stats: Sequence[int], order: int, beta: float) -> float:
    factor, avg_p, avg_r, eff = beta**2, 0.0, 0.0, 0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_p, avg_r, eff = avg_p + n_match / n_hyp, avg_r + n_match / n_ref, eff + 1
    if eff:
        avg_p, avg_r = avg_p / eff, avg_r / eff
    if avg_p + avg_r == 0:
        return 0.0
    return 100 * (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)


def chrf_stats(hypothesis: str, references: str | Sequence[str], order: int = 6, beta: float = 2.0) -> list[int]:
    """One segment's chrF statistics (hyp, ref, matching n-grams per order) against its best-scoring reference."""
    refs = [references] if isinstance(references, str) else list(references)
    h = _char_ngrams(hypothesis, order)
    best, best_f = None, -1.0
    for ref in refs:  # the reference with the best segment F counts
        r = _char_ngrams(ref, order)
        stats = []
        for hc, rc in zip(h, r):
            stats += [sum(hc.values()), sum(rc.values()), sum(min(c, rc[g]) for g, c in hc.items())]
        f = _chrf_from_stats(stats, order, beta)
        if f > best_f:
            best, best_f = stats, f
    return best or [0] * (3 * order)


def chrf_from_stats(stats: Sequence[float], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (0-100) from statistics summed over segments."""
    return _chrf_from_stats(stats, order, beta)


def chrf(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], order: int = 6, beta: float = 2.0
) -> float:
    """Corpus chrF (0-100) equal to sacrebleu.corpus_chrf with its defaults: statistics summed over segments."""
    rows = [chrf_stats(h, r, order, beta) for h, r in zip(hypotheses, _as_ref_lists(references))]
    return _chrf_from_stats(_sum_stats(rows, 3 * order), order, beta)


# --- ROUGE: rouge-score's default tokenizer (lowercase, [a-z0-9] words, no stemming); characters for Chinese ---
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def rouge_tokenize(text: str, chinese: bool | None = None) -> list[str]:
    """Words as rouge-score makes them; one token per non-space character when the text is Chinese."""
    if chinese is None:
        chinese = bool(_CJK.search(text))
    if chinese:
        return [c for c in text.lower() if not c.isspace()]
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _pr(overlap: int, n_pred: int, n_ref: int) -> dict[str, float]:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    return {"precision": p, "recall": r, "fmeasure": 2 * p * r / (p + r) if p + r else 0.0}


def rouge(prediction: str, reference: str, chinese: bool | None = None) -> dict[str, dict[str, float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (precision, recall, F) of one pair, equal to rouge_score.RougeScorer."""
    if chinese is None:
        chinese = bool(_CJK.search(prediction + reference))
    p, r = rouge_tokenize(prediction, chinese), rouge_tokenize(reference, chinese)
    out = {}
    for n in (1, 2):
        pn, rn = _ngrams(p, n), _ngrams(r, n)
        out[f"rouge{n}"] = _pr(sum((pn & rn).values()), sum(pn.values()), sum(rn.values()))
    out["rougeL"] = _pr(_lcs(r, p), len(p), len(r))
    return out
