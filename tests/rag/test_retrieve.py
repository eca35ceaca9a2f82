"""Retrieval: reciprocal-rank fusion equals its formula; hybrid search fuses the BM25 and dense lists."""

from __future__ import annotations

import pytest

from lmlab.errors import LmlabError
from lmlab.rag.index import Index
from lmlab.rag.retrieve import IndexRetriever, report, rrf


def test_rrf_formula():
    got = rrf([["a", "b", "c"], ["c", "a"]], k=60)
    assert got == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61}, abs=1e-15)
    assert rrf([["x"]], k=1) == {"x": 0.5}
    assert rrf([]) == {}


@pytest.mark.parametrize("rrf_k", [60, 5])
def test_hybrid_is_rrf_of_bm25_and_dense(small_index, encoder, rrf_k):
    with Index(small_index) as index:
        r = IndexRetriever(index, encoder, rrf_k=rrf_k, depth=20)
        q = "green tea water temperature"
        bm25 = [h.chunk_id for h in r.search(q, 20, "bm25")]
        dense = [h.chunk_id for h in r.search(q, 20, "dense")]
        want = sorted(rrf([bm25, dense], rrf_k).items(), key=lambda x: -x[1])[:5]
        hits = r.search(q, 5, "hybrid")
        assert [(h.chunk_id, round(h.score, 12)) for h in hits] == [(c, round(s, 12)) for c, s in want]
        assert hits[0].doc_id == "tea.md" and hits[0].rank == 1
        for h in hits:  # the report says why: its rank in each list
            assert h.score == pytest.approx(sum(1 / (rrf_k + w["rank"]) for w in h.why.values()))
        text = report(q, "hybrid", hits)
        assert "tea.md#" in text and "| 1 |" in text
        with pytest.raises(LmlabError, match="unknown retrieval mode 'sparse'"):
            r.search(q, 5, "sparse")
        rel = r.relevance(q, hits)
        assert max(rel) > 0.4 and all(-1 <= x <= 1 for x in rel)


def test_bm25_query_with_fts_syntax_and_no_terms(small_index, encoder):
    with Index(small_index) as index:
        r = IndexRetriever(index, encoder)
        assert r.search('"chess" AND (king OR NEAR) -- *', 3, "bm25")[0].doc_id == "chess.md"
        assert r.search("?!", 3, "bm25") == []  # nothing to match: no hits, no error
