"""Retrieval for a chat server: ground the last user turn in an index, then check the reply's citations.

`lmlab serve --rag INDEX` calls `prepare` before generating (the prompt gets numbered sources) and `finish` after
(citations to no source are dropped and counted); the result travels in the response's `lmlab_rag` field.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from lmlab.rag.ground import ABSTAIN, SYSTEM, build_messages, citations_of, clean_citations
from lmlab.rag.index import Index
from lmlab.rag.retrieve import IndexRetriever, check_mode


class ChatGrounder:
    """An index opened once for a server; `prepare` and `finish` may run on any thread (one at a time)."""

    def __init__(self, index_path: str | os.PathLike, k: int = 3, mode: str = "hybrid", threshold: float | None = None):
        from lmlab.rag.ground import DEFAULT_THRESHOLD

        check_mode(mode, k)
        self.index = Index(index_path, threads=True)
        self.index.require_chunks()
        self.index.warm()  # a server: BM25 postings and vectors in memory before the first request
        self.retriever = IndexRetriever(self.index)
        self.retriever.encoder  # noqa: B018 - load and check the encoder now, not on the first request
        self.k, self.mode = k, mode
        self.threshold = (
            float(self.index.meta.get("abstain_threshold", DEFAULT_THRESHOLD)) if threshold is None else threshold
        )
        self._lock = threading.Lock()

    def prepare(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """(messages with the sources in the last user turn, the retrieval info); info["abstained"] when nothing
        relevant was found (then the caller answers ABSTAIN without generating)."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            return messages, {"sources": [], "citations": [], "abstained": False, "removed_citations": 0}
        last = users[-1]
        question = messages[last]["content"]
        with self._lock:
            hits = self.retriever.search(question, self.k, self.mode)
            relevance = self.retriever.relevance(question, hits)
        sources = [{"n": n, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score, "text": h.text}
                   for n, h in enumerate(hits, 1)]  # fmt: skip
        confidence = max(relevance, default=0.0)
        info = {"sources": sources, "citations": [], "removed_citations": 0, "confidence": confidence,
                "abstained": confidence < self.threshold}  # fmt: skip
        earlier = [m for m in messages[:last] if m["role"] != "system"]
        grounded = [{"role": "system", "content": SYSTEM}, *earlier, build_messages(question, hits)[-1]]
        return grounded, info

    def finish(self, text: str, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The reply with citations to no source removed, and the info with the citations it makes."""
        if info.get("abstained"):
            return ABSTAIN, info
        cleaned, removed = clean_citations(text, len(info["sources"]))
        return cleaned, {**info, "citations": citations_of(cleaned), "removed_citations": removed}
