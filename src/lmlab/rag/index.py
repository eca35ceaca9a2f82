"""The index: one SQLite file with the chunks and their metadata, an FTS5 table (BM25) and the dense vectors.

Documents are keyed by a stable id: indexing again adds new ones, re-chunks changed ones (by a hash of their
text and the chunking settings) and skips unchanged ones; `delete` removes one. Every batch of documents is
written in one transaction, so a run killed at any moment leaves the file as it was after the last whole batch,
and running the same command again finishes the job. Vectors are float32 bytes (no pickle) searched exactly
with one matrix product; above ~1M chunks an approximate index (faiss-cpu) would pay off (docs/rag.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.rag.chunk import Chunk, check_settings, chunk_document
from lmlab.rag.documents import Document
from lmlab.rag.encoder import Encoder

SCHEMA_VERSION = 1
# FTS5's unicode61 tokenizer: lowercase, runs of letters and digits (underscore and punctuation separate).
# `fts_tokens` mirrors it in Python (exactly, for text without diacritics) so that BM25 can be checked.
FTS_TOKENIZER = "unicode61 remove_diacritics 0"
_TOKEN = re.compile(r"[^\W_]+")
# words dropped from queries only: they match nearly every chunk, which costs time and adds no ranking signal
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "that",
        "the",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def fts_tokens(text: str) -> list[str]:
    """Tokens as FTS5's unicode61 tokenizer makes them (for text without diacritics)."""
    return _TOKEN.findall(text.lower())


def query_terms(text: str) -> list[str]:
    """Distinct query tokens in order, stopwords dropped (all kept if nothing else is left)."""
    toks = list(dict.fromkeys(fts_tokens(text)))
    kept = [t for t in toks if t not in STOPWORDS]
    return kept or toks


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs(doc_id TEXT PRIMARY KEY, source TEXT, sha256 TEXT NOT NULL, n_chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, doc_id TEXT NOT NULL, ord INTEGER NOT NULL,
    heading TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(body, tokenize='{FTS_TOKENIZER}');
"""


@dataclass
class IndexStats:
    """What one indexing run did."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0  # chunks written by this run
    total_docs: int = 0
    total_chunks: int = 0


@dataclass
class ChunkRow:
    """A stored chunk, as retrieval returns it."""

    row: int
    chunk_id: str
    doc_id: str
    heading: str
    text: str
    start: int
    end: int


class Index:
    """An open index file. `Index(path)` opens an existing one; `Index.create` makes or extends one."""

    def __init__(self, path: str | os.PathLike, *, threads: bool = False, _create: bool = False) -> None:
        self.path = Path(path)
        if not _create:
            if not self.path.is_file():
                raise LmlabError("no such index", file=str(self.path), hint="build one with `lmlab rag index`")
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise LmlabError("not an lmlab index (not an SQLite file)", file=str(self.path))
        # transactions are explicit (BEGIN ... COMMIT); threads=True lets a server use it from its worker threads,
        # one at a time (the caller holds a lock)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=not threads)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._vectors: np.ndarray | None = None
        self._rows: np.ndarray | None = None
        self._sparse = None  # SparseBM25, or False when FTS5's tokens differ from the mirror (then FTS5 scores)
        self._warm = False  # warm(): keep BM25 postings in memory (a process that answers many queries)
        self._version = None  # PRAGMA data_version when the caches were read: another writer's commit changes it
        if not _create:
            self._check_schema()

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, encoder: Encoder, chunk_tokens: int = 200, overlap: int = 40) -> Index:
        """Open `path` for writing, creating it if needed; an existing index must use the same encoder."""
        path = Path(path)
        if path.exists():
            index = cls(path)
            index.check_encoder(encoder)
            return index
        path.parent.mkdir(parents=True, exist_ok=True)
        index = cls(path, _create=True)
        with index.transaction():
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    index.db.execute(statement)
            meta = {
                "schema_version": SCHEMA_VERSION,
                "encoder": encoder.name,
                "encoder_dim": encoder.dim,
                "encoder_fingerprint": encoder.fingerprint,
                "chunk_tokens": chunk_tokens,
                "overlap": overlap,
            }
            index.db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        return index

    def _check_schema(self) -> None:
        try:
            version = self.meta.get("schema_version")
        except sqlite3.DatabaseError as e:
            raise LmlabError(f"not an lmlab index ({e})", file=str(self.path)) from None
        if version != SCHEMA_VERSION:
            raise LmlabError(f"index schema version {version}, this lmlab reads {SCHEMA_VERSION}", file=str(self.path),
                             hint="rebuild it with `lmlab rag index`")  # fmt: skip

    @property
    def meta(self) -> dict:
        """Settings the index was built with (encoder, chunking, a tuned abstention threshold...)."""
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value) -> None:
        """Store one setting (e.g. the abstention threshold tuned on a dev split)."""
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def check_encoder(self, encoder: Encoder) -> None:
        """Refuse an encoder other than the one that wrote the vectors: its scores would be meaningless."""
        m = self.meta
        same = m["encoder_dim"] == encoder.dim and np.allclose(m["encoder_fingerprint"], encoder.fingerprint, atol=1e-4)
        if not same:
            raise LmlabError(
                f"built with embedding model {m['encoder']!r} (dim {m['encoder_dim']}), "
                f"but this run uses {encoder.name!r} (dim {encoder.dim})",
                file=str(self.path),
                hint=f"pass --encoder {m['encoder']} or build a new index",
            )

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        """BEGIN ... COMMIT, or ROLLBACK on any error: the file never holds half a batch."""
        return _Transaction(self.db)

    # -- writing -----------------------------------------------------------------------------------------
    @staticmethod
    def _doc_hash(doc: Document, m: dict) -> str:
        """What decides whether a document must be re-indexed: its text and the chunking/encoder settings `m`."""
        key = json.dumps([doc.text, m["chunk_tokens"], m["overlap"], m["encoder"]])
        return hashlib.sha256(key.encode()).hexdigest()

    def add(
        self,
        docs: Iterable[Document],
        encoder: Encoder,
        batch_chunks: int = 256,
        progress: Callable[[IndexStats], None] | None = None,
    ) -> IndexStats:
        """Add new documents and re-index changed ones (same id, new text); unchanged ones are skipped."""
        self.check_encoder(encoder)
        m = self.meta
        known = dict(self.db.execute("SELECT doc_id, sha256 FROM docs"))
        stats = IndexStats()
        batch: list[tuple[Document, str, list[Chunk]]] = []
        for doc in docs:
            sha = self._doc_hash(doc, m)
            if known.get(doc.doc_id) == sha:
                stats.unchanged += 1
                continue
            chunks = chunk_document(doc.doc_id, doc.text, encoder.tokenizer, m["chunk_tokens"], m["overlap"])
            batch.append((doc, sha, chunks))
            if doc.doc_id in known:
                stats.updated += 1
            else:
                stats.added += 1
            if sum(len(c) for _, _, c in batch) >= batch_chunks:
                self._write(batch, encoder)
                stats.chunks += sum(len(c) for _, _, c in batch)
                batch = []
                if progress:
                    progress(stats)
        if batch:
            self._write(batch, encoder)
            stats.chunks += sum(len(c) for _, _, c in batch)
        stats.total_docs, stats.total_chunks = self.counts()
        return stats

    def _write(self, batch: list[tuple[Document, str, list[Chunk]]], encoder: Encoder) -> None:
        """One transaction: drop the old chunks of these documents, write the new ones with their vectors."""
        chunks = [c for _, _, cs in batch for c in cs]
        vectors = encoder.encode([c.indexed_text for c in chunks]) if chunks else np.zeros((0, encoder.dim))
        vectors = vectors.astype(np.float32)
        with self.transaction():
            for doc, sha, cs in batch:
                self._delete_chunks(doc.doc_id)
                self.db.execute(
                    "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)", (doc.doc_id, doc.source, sha, len(cs))
                )
            for c, v in zip(chunks, vectors):
                cur = self.db.execute(
                    'INSERT INTO chunks(chunk_id, doc_id, ord, heading, text, start, "end", n_tokens, vector) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (c.chunk_id, c.doc_id, c.ord, c.heading, c.text, c.start, c.end, c.n_tokens, v.tobytes()),
                )
                self.db.execute("INSERT INTO fts(rowid, body) VALUES (?, ?)", (cur.lastrowid, c.indexed_text))
        self._vectors = self._sparse = None

    def _delete_chunks(self, doc_id: str) -> None:
        rows = [r for (r,) in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        self.db.executemany("DELETE FROM fts WHERE rowid = ?", [(r,) for r in rows])
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id (all or nothing); an unknown id is an error. Returns how many were removed."""
        doc_ids = list(doc_ids)
        with self.transaction():
            for doc_id in doc_ids:
                if self.db.execute("SELECT 1 FROM docs WHERE doc_id = ?", (doc_id,)).fetchone() is None:
                    raise LmlabError(f"no document with id {doc_id!r} in this index", file=str(self.path),
                                     field="delete")  # fmt: skip
                self._delete_chunks(doc_id)
                self.db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))
        self._vectors = self._sparse = None
        return len(doc_ids)

    # -- reading -----------------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        docs = self.db.execute("SELECT count(*) FROM docs").fetchone()[0]
        return docs, self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def require_chunks(self) -> None:
        """An empty index cannot answer anything: say so rather than return nothing."""
        if self.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None:  # not count(*): a table scan
            raise LmlabError("the index is empty", file=str(self.path), hint="add documents with `lmlab rag index`")

    def chunks(self, rows: Iterable[int]) -> dict[int, ChunkRow]:
        """Stored chunks by row id."""
        rows = list(rows)
        out = {}
        for start in range(0, len(rows), 500):  # SQLite limits the number of parameters
            part = rows[start : start + 500]
            q = f'SELECT id, chunk_id, doc_id, heading, text, start, "end" FROM chunks WHERE id IN ({",".join("?" * len(part))})'
            for r in self.db.execute(q, part):
                out[r[0]] = ChunkRow(*r)
        return out

    def _fresh(self) -> None:
        """Drop the in-memory copies (vectors, BM25 postings) when the file changed since they were read."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._vectors = self._rows = self._sparse = None
            self._version = version

    def warm(self) -> Index:
        """Keep the vectors and BM25 postings in memory, for a process that answers many queries (server,
        evaluation): BM25 then costs a few ms at 100k chunks instead of FTS5's tens (docs/rag.md). Reading them
        takes ~1 s per 10k chunks, once, and again after the file changes."""
        self._warm = True
        self.vectors()
        self._sparse_postings()
        return self

    def _sparse_postings(self):
        from lmlab.rag.sparse import SparseBM25

        self._fresh()
        if self._sparse is None:
            self._sparse = SparseBM25.from_db(self.db, fts_tokens) or False
        return self._sparse

    def bm25(self, query: str, n: int, engine: str = "auto") -> list[tuple[int, float]]:
        """(row, score) of the n best chunks by FTS5's BM25 (k1 1.2, b 0.75), higher is better.

        `auto`: after `warm()`, the in-memory postings (`rag/sparse.py`: FTS5's scores and order, computed in
        numpy), unless the Python tokens do not mirror FTS5's; else FTS5 itself. `fts5` forces FTS5."""
        if engine not in ("auto", "fts5"):
            raise LmlabError(f"unknown BM25 engine {engine!r}; choose auto or fts5", field="engine")
        terms = query_terms(query)
        if not terms:
            return []
        if engine == "auto" and self._warm:
            sparse = self._sparse_postings()
            if sparse:
                return sparse.search(terms, n)
        match = " OR ".join(f'"{t}"' for t in terms)  # quoted: no word of the question is read as FTS syntax
        q = "SELECT rowid, -bm25(fts) AS s FROM fts WHERE fts MATCH ? ORDER BY s DESC, rowid LIMIT ?"
        return [(r, s) for r, s in self.db.execute(q, (match, n))]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(row ids (N,), float32 matrix (N, d)), read once and kept until the index changes."""
        self._fresh()
        if self._vectors is None:
            rows, blobs = [], []
            for r, b in self.db.execute("SELECT id, vector FROM chunks ORDER BY id"):
                rows.append(r)
                blobs.append(b)
            dim = self.meta["encoder_dim"]
            self._rows = np.array(rows, dtype=np.int64)
            self._vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(rows), dim)
        return self._rows, self._vectors

    def dense(self, query_vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        """(row, cosine) of the n nearest chunks, exact: one matrix-vector product over all vectors."""
        rows, vectors = self.vectors()
        if len(rows) == 0:
            return []
        scores = vectors @ query_vector.astype(np.float32)  # (N,): unit vectors, so cosine
        n = min(n, len(scores))
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.lexsort((rows[top], -scores[top]))]  # best first, ties by row
        return [(int(rows[i]), float(scores[i])) for i in top]


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def build_index(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    encoder: str | Encoder | None = None,
    chunk_tokens: int | None = None,
    overlap: int | None = None,
    delete: Iterable[str] = (),
    progress: Callable[[IndexStats], None] | None = None,
    only: Iterable[str] = (),
) -> IndexStats:
    """`lmlab rag index`: read every input first (a bad file stops the run before anything is written), then
    add/update its documents and delete the ids in `delete`. Settings left None come from the existing index,
    else the defaults (all-MiniLM-L6-v2, 200 tokens, overlap 40). `only`: glob patterns a document id must match."""
    from lmlab.rag.documents import read_documents
    from lmlab.rag.encoder import DEFAULT_ENCODER

    docs = read_documents(inputs) if inputs else []
    only = list(only)
    if only:
        docs = [d for d in docs if any(fnmatch.fnmatchcase(d.doc_id, pattern) for pattern in only)]
        if not docs:
            raise LmlabError(f"no document id matches {', '.join(only)}", field="only")
    delete = list(delete)
    if not docs and not delete:
        raise LmlabError("nothing to do: give documents to add, or --delete ID", field="inputs")
    out = Path(out)
    meta: dict = {}
    if out.exists():
        with Index(out) as existing:  # a file that is not an index fails here, before the encoder loads
            meta = existing.meta
    elif delete:
        raise LmlabError("no such index", file=str(out))
    for name, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap)):
        if meta and value is not None and value != meta[name]:
            raise LmlabError(f"this index was built with {name} {meta[name]}", file=str(out), field=name,
                             hint="use the same settings, or build a new index")  # fmt: skip
    stats = IndexStats()
    if docs:
        name = encoder.name if isinstance(encoder, Encoder) else encoder or meta.get("encoder", DEFAULT_ENCODER)
        enc = encoder if isinstance(encoder, Encoder) else Encoder(name)
        chunk_tokens = meta.get("chunk_tokens", 200) if chunk_tokens is None else chunk_tokens
        overlap = meta.get("overlap", 40) if overlap is None else overlap
        check_settings(chunk_tokens, overlap)
        with Index.create(out, enc, chunk_tokens, overlap) as index:
            stats = index.add(docs, enc, progress=progress)
    with Index(out) as index:
        if delete:
            stats.deleted = index.delete(delete)
        stats.total_docs, stats.total_chunks = index.counts()
    return stats
