"""Retrieval: BM25 (FTS5), dense (exact cosine) and hybrid (reciprocal-rank fusion of the two), with a report of why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lmlab.errors import LmlabError

MODES = ("bm25", "dense", "hybrid")
RRF_K = 60  # Cormack et al. 2009: ranks below ~60 barely matter, and no score scale needs calibrating


@dataclass
class Hit:
    """One retrieved chunk: its score in the chosen mode, and its rank and score in each list it came from."""

    chunk_id: str
    doc_id: str
    heading: str
    text: str
    score: float
    rank: int  # 1-based, in the fused (or single) list
    why: dict[str, dict[str, float]] = field(default_factory=dict)  # {"bm25": {"rank", "score"}, "dense": {...}}
    start: int = 0
    end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever(Protocol):
    """What grounding and evaluation need from a store: the SQLite index here, or Qdrant (rag/qdrant.py)."""

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]: ...

    def relevance(self, query: str, hits: Sequence[Hit]) -> list[float]: ...


def rrf(rankings: Sequence[Sequence[Any]], k: int = RRF_K) -> dict[Any, float]:
    """Reciprocal-rank fusion: score(d) = sum over rankings of 1 / (k + rank of d), ranks from 1."""
    scores: dict[Any, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return scores


def check_mode(mode: str, k: int) -> None:
    """A known mode and a positive k, or one clear error."""
    if mode not in MODES:
        raise LmlabError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}", field="mode")
    if k < 1:
        raise LmlabError(f"k must be at least 1, got {k}", field="k")


class IndexRetriever:
    """Search an `Index` by BM25, by dense vectors or both fused; `depth` candidates per list feed the fusion."""

    def __init__(self, index, encoder=None, rrf_k: int = RRF_K, depth: int = 50) -> None:
        from lmlab.rag.encoder import Encoder

        self.index, self.rrf_k, self.depth = index, rrf_k, depth
        self._encoder, self._checked = encoder, False
        self._encoder_cls = Encoder
        self._last_query: tuple[str, Any] | None = None

    @property
    def encoder(self):
        """The index's encoder, loaded (and checked against the index) on first use: BM25 alone needs none."""
        if self._encoder is None:
            self._encoder = self._encoder_cls(self.index.meta["encoder"])
        if not self._checked:  # once: the index's encoder cannot change under an open retriever
            self.index.check_encoder(self._encoder)
            self._checked = True
        return self._encoder

    def query_vector(self, query: str):
        """The query's embedding; the last one is kept, since a question is searched, then scored for
        relevance (and, in evaluation, searched in several modes) with the same vector."""
        if self._last_query is None or self._last_query[0] != query:
            self._last_query = (query, self.encoder.encode([query])[0])
        return self._last_query[1]

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The k best chunks for `query`, best first."""
        check_mode(mode, k)
        self.index.require_chunks()
        lists: dict[str, list[tuple[int, float]]] = {}
        n = max(k, self.depth) if mode == "hybrid" else k
        if mode in ("bm25", "hybrid"):
            lists["bm25"] = self.index.bm25(query, n)
        if mode in ("dense", "hybrid"):
            lists["dense"] = self.index.dense(self.query_vector(query), n)
        why: dict[int, dict[str, dict[str, float]]] = {}
        for name, ranked in lists.items():
            for rank, (row, score) in enumerate(ranked, 1):
                why.setdefault(row, {})[name] = {"rank": rank, "score": score}
        if mode == "hybrid":
            fused = rrf([[r for r, _ in lists["bm25"]], [r for r, _ in lists["dense"]]], self.rrf_k)
            ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
        else:
            ranked = lists[mode][:k]
        rows = self.index.chunks(r for r, _ in ranked)
        hits = []
        for rank, (row, score) in enumerate(ranked, 1):
            c = rows[row]
            hits.append(Hit(c.chunk_id, c.doc_id, c.heading, c.text, score, rank, why[row], c.start, c.end))
        return hits

    def relevance(self, query: str, hits: Sequence[Hit]) -> list[float]:
        """Cosine between the query and each hit's stored vector: one scale for every mode, for abstention."""
        if not hits:
            return []
        import numpy as np

        q = self.query_vector(query)
        ids = {cid: i for i, cid in enumerate(h.chunk_id for h in hits)}
        placeholders = ",".join("?" * len(ids))
        out = [0.0] * len(hits)
        for cid, blob in self.index.db.execute(
            f"SELECT chunk_id, vector FROM chunks WHERE chunk_id IN ({placeholders})", list(ids)
        ):
            out[ids[cid]] = float(np.frombuffer(blob, dtype=np.float32) @ q)
        return out


def report(query: str, mode: str, hits: Sequence[Hit]) -> str:
    """A per-query report: each hit's fused rank and score, and its rank and score in the BM25 and dense lists."""
    lines = [
        f"query: {query!r} (mode {mode}, {len(hits)} hits)",
        "| # | chunk | score | bm25 rank (score) | dense rank (cosine) | heading |",
        "|---:|---|---:|---|---|---|",
    ]
    for h in hits:
        cells = []
        for name in ("bm25", "dense"):
            w = h.why.get(name)
            cells.append(f"{int(w['rank'])} ({w['score']:.3f})" if w else "-")
        lines.append(f"| {h.rank} | {h.chunk_id} | {h.score:.4f} | {cells[0]} | {cells[1]} | {h.heading[:60]} |")
    return "\n".join(lines) + "\n"
