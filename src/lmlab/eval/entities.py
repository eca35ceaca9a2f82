"""Entity-level precision, recall and F1 over BIO tag sequences, scored the way `seqeval` (default mode) and
conlleval score them.

Chunking follows conlleval's rules, not strict IOB2: an I- tag after O, or after a tag of another type, starts a
new entity; a change of type inside an entity ends it and starts another. E- and S- tags (IOBES) are understood
too. An entity counts as correct only when its type, start and end all match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmlab.errors import LmlabError

Span = tuple[str, int, int]


def _split(tag: str, pos: int) -> tuple[str, str]:
    """(prefix, type) of one tag; "O" has type "" so that it never continues an entity."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] == "-":
        return tag[0], tag[2:]
    raise LmlabError(f"tag {tag!r} at position {pos} is not O, B-TYPE, I-TYPE, E-TYPE or S-TYPE")


def bio_spans(tags: Sequence[str]) -> list[Span]:
    """Entities of one tag sequence as (type, start, end) with `end` exclusive, in order of start."""
    spans: list[Span] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):  # a trailing O closes an entity that runs to the end
        t, typ = _split(tag, i)
        ends = prev_tag in "ES" or (prev_tag in "BI" and t in "BSO") or (prev_tag != "O" and prev_type != typ)
        if ends:
            spans.append((prev_type, begin, i))
        starts = t in "BS" or (prev_tag in "ESO" and t in "EI") or (t != "O" and prev_type != typ)
        if starts:
            begin = i
        prev_tag, prev_type = t, typ
    return spans


def _prf(correct: int, predicted: int, true: int) -> dict[str, float]:
    # as seqeval with zero_division="warn": 0/0 counts as 0
    p = correct / predicted if predicted else 0.0
    r = correct / true if true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_f1(true_tag_seqs: Sequence[Sequence[str]], pred_tag_seqs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro-averaged entity precision/recall/F1, support (true entities), token accuracy, and the same per type."""
    if len(true_tag_seqs) != len(pred_tag_seqs):
        raise LmlabError(f"{len(true_tag_seqs)} true sequences but {len(pred_tag_seqs)} predicted ones")
    true_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    tokens = same = 0
    for k, (true, pred) in enumerate(zip(true_tag_seqs, pred_tag_seqs)):
        if len(true) != len(pred):
            raise LmlabError(f"sequence {k}: {len(true)} true tags but {len(pred)} predicted ones")
        true_set.update((k, *s) for s in bio_spans(true))
        pred_set.update((k, *s) for s in bio_spans(pred))
        tokens += len(true)
        same += sum(a == b for a, b in zip(true, pred))
    hit = true_set & pred_set
    n_true, n_pred, n_hit = Counter(s[1] for s in true_set), Counter(s[1] for s in pred_set), Counter(s[1] for s in hit)
    per_type = {
        typ: {**_prf(n_hit[typ], n_pred[typ], n_true[typ]), "support": n_true[typ], "predicted": n_pred[typ]}
        for typ in sorted(set(n_true) | set(n_pred))
    }
    return {
        **_prf(len(hit), len(pred_set), len(true_set)),
        "support": len(true_set),
        "predicted": len(pred_set),
        "accuracy": same / tokens if tokens else 0.0,
        "per_type": per_type,
    }
