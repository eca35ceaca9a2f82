"""Retrieval-augmented generation: chunk, index (SQLite: FTS5 BM25 + dense vectors), retrieve, ground, evaluate."""

from lmlab.rag.ask import Asker, ask
from lmlab.rag.chunk import Chunk, chunk_document
from lmlab.rag.documents import Document, read_documents
from lmlab.rag.ground import GroundedAnswer, answer_question
from lmlab.rag.index import Index, build_index
from lmlab.rag.retrieve import Hit, IndexRetriever, rrf

__all__ = [
    "Asker",
    "Chunk",
    "Document",
    "GroundedAnswer",
    "Hit",
    "Index",
    "IndexRetriever",
    "answer_question",
    "ask",
    "build_index",
    "chunk_document",
    "read_documents",
    "rrf",
]
