"""The retriever on Qdrant (local mode): dense equal to the SQLite index's, BM25 equal to its formula with Qdrant's
IDF, hybrid equal to reciprocal-rank fusion of the two."""

from __future__ import annotations

import math

import pytest
from qdrant_client import QdrantClient

from lmlab.rag.index import Index, fts_tokens, query_terms
from lmlab.rag.qdrant import QdrantRetriever
from lmlab.rag.retrieve import IndexRetriever, rrf

from .test_index import QUERIES


@pytest.fixture(scope="module")
def both(small_index, encoder):
    index = Index(small_index)
    q = QdrantRetriever(QdrantClient(":memory:"), "notes", encoder)
    q.create(encoder.dim)
    assert q.add_index(index) == index.counts()[1]
    yield q, IndexRetriever(index, encoder), index
    index.close()


def test_dense_and_bm25_scores(both):
    q, ours, index = both
    bodies = {cid: f"{h}\n{t}" for cid, h, t in index.db.execute("SELECT chunk_id, heading, text FROM chunks")}
    toks = {cid: fts_tokens(b) for cid, b in bodies.items()}
    avg = sum(map(len, toks.values())) / len(toks)
    for query in QUERIES:
        got = [(h.chunk_id, h.score) for h in q.search(query, 5, "dense")]
        want = [(h.chunk_id, h.score) for h in ours.search(query, 5, "dense")]
        assert [c for c, _ in got] == [c for c, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
        # BM25 with Qdrant's IDF, ln((N - n + 0.5) / (n + 0.5) + 1), by hand
        terms = query_terms(query)
        df = {t: sum(t in ts for ts in toks.values()) for t in terms}
        expect = {}
        for cid, ts in toks.items():
            norm = 1.2 * (1 - 0.75 + 0.75 * len(ts) / avg)
            s = sum(math.log((len(toks) - df[t] + 0.5) / (df[t] + 0.5) + 1) * ts.count(t) * 2.2 / (ts.count(t) + norm)
                    for t in terms if t in ts)  # fmt: skip
            if s > 0:
                expect[cid] = s
        hits = q.search(query, 5, "bm25")
        for h in hits:
            assert h.score == pytest.approx(expect[h.chunk_id], rel=1e-5)
        assert hits[0].chunk_id == max(expect, key=expect.get)
        assert hits[0].doc_id == ours.search(query, 1, "bm25")[0].doc_id  # the same page as FTS5's BM25


def test_hybrid_is_rrf_and_delete(both):
    q, _, _ = both
    query = QUERIES[0]
    bm25 = [h.chunk_id for h in q.search(query, 50, "bm25")]
    dense = [h.chunk_id for h in q.search(query, 50, "dense")]
    want = rrf([bm25, dense], 60)
    hits = q.search(query, 5, "hybrid")
    assert [h.score for h in hits] == pytest.approx(sorted(want.values(), reverse=True)[:5], abs=1e-9)
    assert all(want[h.chunk_id] == pytest.approx(h.score) for h in hits)
    assert max(q.relevance(query, hits)) > 0.4
    q.delete_docs(["tea.md"])
    assert all(h.doc_id != "tea.md" for h in q.search(query, 10, "hybrid"))
