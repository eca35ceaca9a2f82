"""The `lmlab rag` commands: the public contract of `rag ask --json`, updates and deletes, and one-line errors."""

from __future__ import annotations

import json

from lmlab.cli import main

from .conftest import write_corpus


def test_index_ask_delete(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "notes")
    out = tmp_path / "idx.sqlite"
    assert main(["rag", "index", str(corpus), "--out", str(out), "--chunk-tokens", "32", "--overlap", "8"]) == 0
    assert "6 added, 0 updated, 0 unchanged" in capsys.readouterr().out
    assert main(["rag", "ask", str(out), "How long does a worker bee live?", "--model", "extract", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert isinstance(a["answer"], str) and a["abstained"] is False and "six weeks" in a["answer"]
    assert len(a["sources"]) == 5 and [s["n"] for s in a["sources"]] == [1, 2, 3, 4, 5]
    assert all(set(s) >= {"n", "doc_id", "chunk_id", "score", "text"} for s in a["sources"])
    assert a["citations"] and all(isinstance(n, int) for n in a["citations"])
    assert (
        main(["rag", "ask", str(out), "tea or bike", "--model", "extract", "--mode", "bm25", "--k", "2", "--json"]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)["sources"]) == 2
    assert main(["rag", "index", "--out", str(out), "--delete", "bees.md"]) == 0
    assert "1 deleted" in capsys.readouterr().out
    assert main(["rag", "ask", str(out), "How long does a worker bee live?", "--model", "extract", "--verbose"]) == 0
    assert "bees.md" not in capsys.readouterr().out


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(tmp_path, capsys, minilm_dir):
    out = tmp_path / "idx.sqlite"
    bad = tmp_path / "bad.md"
    bad.write_bytes(b"\xff\xfe not utf-8")
    assert "bad.md:1: not UTF-8" in _error(capsys, ["rag", "index", str(bad), "--out", str(out)])
    assert not out.exists()
    assert "no such index" in _error(capsys, ["rag", "ask", str(out), "q"])
    (tmp_path / "junk.sqlite").write_text("hello")
    assert "not an lmlab index" in _error(capsys, ["rag", "ask", str(tmp_path / "junk.sqlite"), "q"])
    # an empty index: every document deleted
    corpus = write_corpus(tmp_path / "one", {"a.md": "# A\n\nalpha beta\n"})
    assert main(["rag", "index", str(corpus), "--out", str(out)]) == 0
    assert main(["rag", "index", "--out", str(out), "--delete", "a.md"]) == 0
    capsys.readouterr()
    assert "the index is empty" in _error(capsys, ["rag", "ask", str(out), "q", "--model", "extract"])
    assert "k must be at least 1, got 0" in _error(capsys, ["rag", "ask", str(out), "q", "--k", "0"])
