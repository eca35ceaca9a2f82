"""Entity-level F1: parity with seqeval 1.2.2 (default, conlleval-compatible mode)."""

from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from lmlab.errors import LmlabError
from lmlab.eval.entities import bio_spans, entity_f1

EDGE_CASES = [
    ["B-PER", "I-PER", "O", "B-LOC"],  # entity at the very end
    ["I-PER", "I-PER", "O"],  # I- without B- starts an entity
    ["O", "I-LOC", "B-LOC", "I-LOC"],  # orphan I- then a proper entity right after it
    ["B-PER", "I-LOC", "I-LOC"],  # type change mid-entity: two entities
    ["B-PER", "B-PER", "I-PER"],  # B- after B- of the same type splits
    ["I-ORG"],
    ["B-ORG"],
    ["O", "O"],
    [],
    ["B-MISC-X", "I-MISC-X"],  # a type with a dash in it
    ["S-PER", "I-PER", "E-PER", "B-LOC", "E-LOC", "E-LOC"],  # IOBES tags follow seqeval's chunking
]


def _seqeval_spans(tags):
    return [(t, s, e + 1) for t, s, e in get_entities(list(tags))]  # seqeval's end is inclusive


def _random_tags(rng: random.Random, n: int, iobes: bool = False) -> list[str]:
    prefixes = "BIES" if iobes else "BI"
    return [
        "O" if rng.random() < 0.4 else f"{rng.choice(prefixes)}-{rng.choice(['PER', 'LOC', 'ORG'])}" for _ in range(n)
    ]


def test_bio_spans_by_hand():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert bio_spans(["O", "I-LOC", "I-LOC"]) == [("LOC", 1, 3)]
    assert bio_spans(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]
    assert bio_spans([]) == []


@pytest.mark.parametrize("tags", EDGE_CASES)
def test_bio_spans_match_seqeval_on_edge_cases(tags):
    assert bio_spans(tags) == _seqeval_spans(tags)


def test_bio_spans_match_seqeval_on_random_sequences():
    rng = random.Random(0)
    for k in range(500):
        tags = _random_tags(rng, rng.randint(0, 12), iobes=k % 5 == 0)
        assert bio_spans(tags) == _seqeval_spans(tags), tags


def _assert_parity(y_true, y_pred):
    got = entity_f1(y_true, y_pred)
    with warnings.catch_warnings():  # seqeval warns on 0/0 and counts it as 0, as we do
        warnings.simplefilter("ignore")
        assert got["precision"] == pytest.approx(precision_score(y_true, y_pred), abs=1e-12)
        assert got["recall"] == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
        assert got["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
        if got["support"] + got["predicted"] == 0:
            return
        report = classification_report(y_true, y_pred, output_dict=True)
    types = {k for k in report if not k.endswith(" avg")}
    assert set(got["per_type"]) == types
    for t in types:
        mine, theirs = got["per_type"][t], report[t]
        for key in ("precision", "recall"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-12)
        assert mine["f1"] == pytest.approx(theirs["f1-score"], abs=1e-12)
        assert mine["support"] == theirs["support"]
    assert got["support"] == report["micro avg"]["support"]


def test_entity_f1_matches_seqeval_on_random_corpora():
    rng = random.Random(1)
    for k in range(60):
        n = rng.randint(1, 8)
        y_true = [_random_tags(rng, rng.randint(0, 10)) for _ in range(n)]
        # predictions: the truth with some tags flipped, so that many entities match and some do not
        y_pred = [[t if rng.random() < 0.7 else _random_tags(rng, 1, iobes=k % 7 == 0)[0] for t in s] for s in y_true]
        _assert_parity(y_true, y_pred)


def test_entity_f1_matches_seqeval_on_edge_cases():
    _assert_parity(EDGE_CASES, [list(reversed(s)) for s in EDGE_CASES])
    _assert_parity(EDGE_CASES, EDGE_CASES)
    _assert_parity([["B-PER", "I-PER"]], [["O", "O"]])  # nothing predicted: precision 0, not an error
    _assert_parity([["O", "O"]], [["B-PER", "O"]])  # nothing true


def test_entity_f1_values_by_hand():
    # sentence boundaries matter: an entity at the end of one sentence does not merge with the next one's I-
    y_true = [["B-PER", "I-PER", "O"], ["I-PER", "O", "B-LOC"]]
    y_pred = [["B-PER", "I-PER", "O"], ["I-PER", "O", "O"]]
    got = entity_f1(y_true, y_pred)
    assert (got["support"], got["predicted"]) == (3, 2)
    assert got["precision"] == 1.0 and got["recall"] == pytest.approx(2 / 3)
    assert got["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert got["accuracy"] == pytest.approx(5 / 6)


def test_entity_f1_rejects_bad_input():
    with pytest.raises(LmlabError, match="sequence 1: 2 true tags but 1 predicted"):
        entity_f1([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(LmlabError, match="2 true sequences but 1 predicted"):
        entity_f1([["O"], ["O"]], [["O"]])
    with pytest.raises(LmlabError, match="tag 'PER' at position 1"):
        bio_spans(["O", "PER"])
