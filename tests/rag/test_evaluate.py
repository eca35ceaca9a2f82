"""`rag eval`: the metrics against hand computations and scikit-learn, and an end-to-end run on the small corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.rag.evaluate import answer_scores, auroc, coverage_curve, retrieval_scores, strip_markup, tune_threshold

from .conftest import write_jsonl


def test_retrieval_scores_by_hand():
    got = retrieval_scores(["b", "b", "a", "c", "d"], ["a", "d"], ks=(1, 5))
    assert got["recall@1"] == 0 and got["recall@5"] == 1.0
    assert got["mrr"] == 0.5  # pages in order: b, a, c, d
    assert got["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_answer_scores_see_through_rest_markup():
    # SQuAD normalization deletes punctuation: ":mod:`json`" used to become "modjson" and score 0 against "json"
    assert strip_markup(":mod:`json` and ``json.dumps``") == " json  and   json.dumps  "
    got = answer_scores("It is the :mod:`json` module.", ["json"])
    assert got["contains"] == 1.0 and got["f1"] == pytest.approx(
        2 * (1 / 4) / (1 / 4 + 1)
    )  # "it is json module": 4 tokens
    assert answer_scores("Use ``json.dumps``", ["json.dumps"])["contains"] == 1.0
    assert answer_scores("The pickle module", ["json"]) == {"em": 0.0, "f1": 0.0, "contains": 0.0}


def test_auroc_threshold_and_curve():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200).round(1), rng.integers(0, 2, 200)  # rounded: ties count half, as scikit-learn
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert tune_threshold([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1]) == pytest.approx(0.4)
    curve = coverage_curve([0.9, 0.1, 0.5], [1, 0, 0])
    assert [p["accuracy"] for p in curve] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_rag_eval_end_to_end(small_index, tmp_path, capsys):
    rows = [
        {"question": "How long does a worker bee live in summer?", "answers": ["six weeks"], "doc_ids": ["bees.md"]},
        {"question": "What pressure for a road bike tyre?", "answers": ["6 bar"], "doc_ids": ["bikes.md"]},
        {"question": "What is lava?", "answers": ["magma that reaches the surface"], "doc_ids": ["volcano.md"]},
        {"question": "Who painted the Mona Lisa?", "answers": [], "doc_ids": []},
        {"question": "What is the GDP of Norway?", "answers": [], "doc_ids": []},
    ]
    qa = write_jsonl(tmp_path / "qa.jsonl", rows)
    labels = write_jsonl(tmp_path / "labels.jsonl", [
        {"sentence": "A worker bee lives six weeks [1].", "source": "A worker bee lives about six weeks in summer.", "supported": True},
        {"sentence": "Lava is frozen water [1].", "source": "Magma that reaches the surface is called lava.", "supported": False},
    ])  # fmt: skip
    out = tmp_path / "res"
    argv = [
        "rag",
        "eval",
        str(small_index),
        "--qa",
        str(qa),
        "--out",
        str(out),
        "--dev",
        str(qa),
        "--labels",
        str(labels),
    ]
    assert main(argv) == 0
    assert "## Retrieval" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["retrieval"]["n"] == 3 and r["retrieval"]["hybrid"]["recall@5"]["mean"] == 1.0
    assert r["abstention"]["auroc"] == 1.0 and r["abstention"]["accuracy"]["mean"] == 1.0
    assert r["support_validation"]["accuracy"] == 1.0
    assert r["answers"]["extract"]["contains"]["mean"] > 0.6
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "retrieval.png", "coverage.png"}
    write_jsonl(qa, [{"question": "q", "answers": "x", "doc_ids": []}])
    assert main(argv) == 1
    assert "qa.jsonl:1: answers: expected a list" in capsys.readouterr().err


def test_replay_rescores_stored_generations(small_index, tmp_path):
    """--replay: an earlier run's drafts and detector samples are scored again, no model loaded."""
    from lmlab.rag.evaluate import evaluate_rag

    rows = [
        {"question": "How long does a worker bee live in summer?", "answers": ["six weeks"], "doc_ids": ["bees.md"]},
        {"question": "What is lava?", "answers": ["magma that reaches the surface"], "doc_ids": ["volcano.md"]},
    ]
    qa = write_jsonl(tmp_path / "qa.jsonl", rows)
    drafts = {rows[0]["question"]: ("A worker bee lives about six weeks in summer [1].", "About a year."),
              rows[1]["question"]: ("Lava is frozen water [9].", "Magma that reaches the surface.")}  # fmt: skip
    prev = {"config": {"model": "some-model"}, "records": [
        {"question": q, "rag_draft": d, "closed_book": c,
         "consistency": {"answer": c, "samples": [c, "Ten days."]}} for q, (d, c) in drafts.items()]}  # fmt: skip
    (tmp_path / "prev.json").write_text(json.dumps(prev))
    r = evaluate_rag(small_index, qa, tmp_path / "res", dev_path=qa, consistency=2, replay=tmp_path / "prev.json")
    recs = {x["question"]: x for x in r["records"]}
    assert recs[rows[0]["question"]]["rag_answer"] == drafts[rows[0]["question"]][0]
    assert recs[rows[1]["question"]]["rag_answer"] == "Lava is frozen water."  # [9]: no such source, removed
    assert r["config"]["model"] == "some-model" and r["answers"]["closed_book"]["contains"]["mean"] == 0.5
    assert r["detector"]["n"] == 2 and r["detector"]["n_wrong"] == 1
    assert "replayed from" in (tmp_path / "res" / "report.md").read_text()
    with pytest.raises(LmlabError, match="did not answer"):
        evaluate_rag(small_index, write_jsonl(tmp_path / "other.jsonl", [{"question": "Why?", "answers": ["x"],
                     "doc_ids": ["bees.md"]}]), tmp_path / "res2", replay=tmp_path / "prev.json")  # fmt: skip
