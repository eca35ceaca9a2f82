"""The same retriever on Qdrant, for when one SQLite file is not enough: many machines, replicas, filters.

Each chunk is a point with two named vectors: "dense" (MiniLM, cosine) and "bm25", a sparse vector of BM25
term weights (tf saturation and length normalization computed here; Qdrant multiplies in the IDF itself,
`Modifier.IDF`, so it stays right as documents come and go). Hybrid search is Qdrant's native reciprocal-rank
fusion over the two prefetched lists. `QdrantClient(":memory:")` or `QdrantClient(path=...)` (local mode,
tested) and `QdrantClient(url="http://host:6333")` (a cluster, docs/rag.md) behave the same.
Needs `pip install qdrant-client` (the `rag` extra).
"""

from __future__ import annotations

import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.rag.index import Index, fts_tokens, query_terms
from lmlab.rag.retrieve import RRF_K, Hit, check_mode

K1, B = 1.2, 0.75


def _models():
    try:
        from qdrant_client import models
    except ImportError:
        raise LmlabError("Qdrant needs qdrant-client", hint="pip install 'lmlab[rag]'") from None
    return models


def term_id(term: str) -> int:
    """A sparse-vector index for a term: its CRC-32 (collisions are rare and only add a little noise)."""
    return zlib.crc32(term.encode())


def bm25_vector(text: str, avg_len: float) -> tuple[list[int], list[float]]:
    """(indices, values): each term's BM25 term-frequency part, tf (k1 + 1) / (tf + k1 (1 - b + b len / avg))."""
    tokens = fts_tokens(text)
    norm = K1 * (1 - B + B * len(tokens) / avg_len)
    counts = Counter(tokens)
    return [term_id(t) for t in counts], [tf * (K1 + 1) / (tf + norm) for tf in counts.values()]


class QdrantRetriever:
    """search/relevance like IndexRetriever, over a Qdrant collection filled from an lmlab index."""

    def __init__(self, client, collection: str, encoder, rrf_k: int = RRF_K, depth: int = 50) -> None:
        self.client, self.collection, self.encoder, self.rrf_k, self.depth = client, collection, encoder, rrf_k, depth
        self.avg_len = 100.0

    def create(self, dim: int) -> None:
        """A fresh collection: a cosine "dense" vector and an IDF-weighted sparse "bm25" vector per point."""
        m = _models()
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)
        self.client.create_collection(
            self.collection,
            vectors_config={"dense": m.VectorParams(size=dim, distance=m.Distance.COSINE)},
            sparse_vectors_config={"bm25": m.SparseVectorParams(modifier=m.Modifier.IDF)},
        )

    def add_index(self, index: Index, batch: int = 256) -> int:
        """Copy every chunk of an lmlab index (text, metadata, its stored vector) into the collection."""
        m = _models()
        rows = list(index.db.execute('SELECT chunk_id, doc_id, heading, text, start, "end", vector FROM chunks'))
        bodies = [f"{h}\n{t}" if h else t for _, _, h, t, *_ in rows]
        self.avg_len = float(np.mean([len(fts_tokens(b)) for b in bodies])) if bodies else 100.0
        for start in range(0, len(rows), batch):
            points = []
            for (cid, doc, head, text, a, b, vec), body in zip(
                rows[start : start + batch], bodies[start : start + batch]
            ):
                idx, val = bm25_vector(body, self.avg_len)
                points.append(m.PointStruct(
                    id=str(uuid.uuid5(uuid.NAMESPACE_URL, cid)),
                    vector={"dense": np.frombuffer(vec, dtype=np.float32).tolist(),
                            "bm25": m.SparseVector(indices=idx, values=val)},
                    payload={"chunk_id": cid, "doc_id": doc, "heading": head, "text": text, "start": a, "end": b},
                ))  # fmt: skip
            self.client.upsert(self.collection, points)
        return len(rows)

    def delete_docs(self, doc_ids: Iterable[str]) -> None:
        """Remove every chunk of these documents."""
        m = _models()
        cond = m.FieldCondition(key="doc_id", match=m.MatchAny(any=list(doc_ids)))
        self.client.delete(self.collection, m.FilterSelector(filter=m.Filter(must=[cond])))

    def _sparse_query(self, query: str):
        terms = query_terms(query)
        return _models().SparseVector(indices=[term_id(t) for t in terms], values=[1.0] * len(terms))

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The k best chunks: BM25 (sparse), dense (cosine) or Qdrant's RRF of both."""
        m = _models()
        check_mode(mode, k)
        dense = self.encoder.encode([query])[0].tolist() if mode != "bm25" else None
        if mode == "bm25":
            res = self.client.query_points(self.collection, query=self._sparse_query(query), using="bm25", limit=k)
        elif mode == "dense":
            res = self.client.query_points(self.collection, query=dense, using="dense", limit=k)
        else:
            n = max(k, self.depth)
            res = self.client.query_points(
                self.collection,
                prefetch=[m.Prefetch(query=self._sparse_query(query), using="bm25", limit=n),
                          m.Prefetch(query=dense, using="dense", limit=n)],
                # Qdrant scores rank r (from 1) as 1 / (k + r - 1); k + 1 gives 1 / (k + r), the formula rrf() uses
                query=m.RrfQuery(rrf=m.Rrf(k=self.rrf_k + 1)),
                limit=k,
            )  # fmt: skip
        hits = []
        for rank, p in enumerate(res.points, 1):
            d = p.payload
            hits.append(
                Hit(d["chunk_id"], d["doc_id"], d["heading"], d["text"], p.score, rank, {}, d["start"], d["end"])
            )
        return hits

    def relevance(self, query: str, hits: Sequence[Hit]) -> list[float]:
        """Cosine between the query and each hit (for abstention, as IndexRetriever)."""
        if not hits:
            return []
        q = self.encoder.encode([query])[0]
        ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, h.chunk_id)) for h in hits]
        got = {p.id: p.vector["dense"] for p in self.client.retrieve(self.collection, ids, with_vectors=["dense"])}
        return [float(np.asarray(got[i], dtype=np.float32) @ q) for i in ids]
