"""Chunking: heading paths, offsets back into the document, window sizes and overlap."""

from __future__ import annotations

import itertools

import pytest

from lmlab.errors import LmlabError
from lmlab.rag.chunk import chunk_document, sections

RST = """\
=====
Title
=====

Intro text.

Part one
--------

Words of part one.

Detail
~~~~~~

Deep words.

Part two
--------

Words of part two.
"""

MD = "# A\n\nalpha\n\n## B\n\nbeta\n\n### C\n\ngamma\n\n## D\n\ndelta\n\n# E\n\nepsilon\n"


def test_sections_keep_heading_paths():
    assert [h for h, _, _ in sections(MD)] == ["A", "A > B", "A > B > C", "A > D", "E"]
    assert [h for h, _, _ in sections(RST)] == ["Title", "Title > Part one", "Title > Part one > Detail",
                                                "Title > Part two"]  # fmt: skip
    for _, a, b in sections(RST):
        assert "---" not in RST[a:b] and "~~~" not in RST[a:b]  # bodies hold no heading lines
    assert sections("no headings at all\n") == [("", 0, 19)]


def test_windows_offsets_and_overlap(encoder):
    words = " ".join(f"word{i}" for i in range(300))
    text = f"# Head\n\n{words}\n\n## Sub\n\nshort tail here\n"
    chunks = chunk_document("d", text, encoder.tokenizer, chunk_tokens=40, overlap=10)
    for c in chunks:
        assert text[c.start : c.end] == c.text  # offsets point back at the exact passage
        assert c.n_tokens <= 40
        assert c.chunk_id == f"d#{c.ord}"
    assert chunks[-1].heading == "Head > Sub" and chunks[-1].text == "short tail here"
    body = [c for c in chunks if c.heading == "Head"]
    assert len(body) > 5
    for a, b in itertools.pairwise(body):
        assert a.start < b.start < a.end  # neighbours overlap
        shared = set(a.text.split()) & set(b.text.split())
        assert 2 <= len(shared) <= 6  # ~10 shared tokens: a few whole words ("word123" is 3-4 word pieces)
    assert " ".join(c.text for c in body).count("word299") >= 1
    assert chunks[0].indexed_text.startswith("Head\n")


def test_bad_settings(encoder):
    with pytest.raises(LmlabError, match="overlap must be in"):
        chunk_document("d", "text", encoder.tokenizer, chunk_tokens=16, overlap=16)
    with pytest.raises(LmlabError, match="chunk_tokens must be at least 8"):
        chunk_document("d", "text", encoder.tokenizer, chunk_tokens=2, overlap=0)
    assert chunk_document("d", "   \n\n", encoder.tokenizer) == []
