"""BM25 in memory: FTS5's formula over per-term posting arrays, so a query costs a few vectorized adds.

Why beside FTS5: FTS5 scores every chunk that matches any query word with its `bm25()` function, one row at a
time (and a first pass over each word's postings for its IDF). At 100k chunks a query matches ~30k of them and
that took 30-60 ms on one core, twice that next to the dense search; numpy over the same postings takes a few
ms. The SQLite file stays the one store: this is a cache read from its FTS5 rows, kept by the open `Index`
until the file changes, and built only when the Python tokens agree with FTS5's own document lengths (else
`Index.bm25` keeps using FTS5). Scores are FTS5's to the last bit: same doubles, same order of operations.
"""

from __future__ import annotations

import math
import sqlite3

import numpy as np

K1, B = 1.2, 0.75  # FTS5's bm25() defaults


def _varint(blob: bytes) -> int:
    """The first varint of an FTS5 `docsize` record (SQLite's format: 7 bits a byte, high bit = more)."""
    v = 0
    for i, byte in enumerate(blob[:9]):
        if i == 8:
            return (v << 8) | byte
        v = (v << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return v
    return v


class SparseBM25:
    """Posting arrays (rows and BM25 weights as FTS5 computes them) grouped by term, from an index's `fts` table."""

    def __init__(self, rows: np.ndarray, vocab: dict[str, int], offsets: np.ndarray, docs: np.ndarray,
                 weights: np.ndarray) -> None:  # fmt: skip
        # term t's postings: docs[offsets[t]:offsets[t + 1]] (positions in `rows`, ascending) and their weights
        self.rows, self.vocab, self.offsets, self.docs, self.weights = rows, vocab, offsets, docs, weights

    @classmethod
    def from_db(cls, db: sqlite3.Connection, tokenize) -> SparseBM25 | None:
        """Read every FTS5 row and tokenize it with `tokenize`; None when any document's token count differs from
        the one FTS5 stored (text the Python tokenizer does not mirror), so that BM25 stays FTS5's."""
        sizes = dict(db.execute("SELECT id, sz FROM fts_docsize"))
        rows, lengths, ids = [], [], []
        vocab: dict[str, int] = {}
        for row, body in db.execute("SELECT rowid, body FROM fts ORDER BY rowid"):
            toks = tokenize(body)
            sz = sizes.get(row)
            if sz is None or _varint(sz) != len(toks):
                return None
            rows.append(row)
            lengths.append(len(toks))
            ids += [vocab.setdefault(t, len(vocab)) for t in toks]
        n, n_terms = len(rows), len(vocab)
        doc_len = np.array(lengths, dtype=np.float64)
        # one key per (term, document) pair, term-major: unique keys sorted = postings grouped by term, rows ascending
        doc_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
        keys, tf = np.unique(np.array(ids, dtype=np.int64) * max(n, 1) + doc_of, return_counts=True)
        term, docs = keys // max(n, 1), keys % max(n, 1)
        df = np.bincount(term, minlength=n_terms)
        offsets = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(df, out=offsets[1:])
        # fts5_aux.c: idf = log((N - nHit + 0.5) / (nHit + 0.5)) with libm's log, floored at 1e-6 when <= 0
        # (words in over half the chunks); avgdl = total tokens / rows
        idf = np.array([math.log((n - h + 0.5) / (h + 0.5)) for h in df.tolist()], dtype=np.float64)
        idf[idf <= 0.0] = 1e-6
        avgdl = float(doc_len.sum()) / n if n else 1.0
        tf = tf.astype(np.float64)
        # score += idf * ((tf * (k1 + 1)) / (tf + k1 * (1 - b + b * D / avgdl))): the same operations in the same order
        weights = idf[term] * ((tf * (K1 + 1.0)) / (tf + K1 * (1 - B + B * doc_len[docs] / avgdl)))
        return cls(np.array(rows, dtype=np.int64), vocab, offsets, docs, weights)

    def search(self, terms: list[str], n: int) -> list[tuple[int, float]]:
        """(row, score) of the n best rows that hold any of `terms`, best first, ties by row: FTS5's ranking."""
        scores = np.zeros(len(self.rows), dtype=np.float64)
        hit = np.zeros(len(self.rows), dtype=bool)
        for term in terms:  # in query order: the same sum, term by term, as FTS5's bm25()
            t = self.vocab.get(term)
            if t is not None:
                lo, hi = self.offsets[t], self.offsets[t + 1]
                d = self.docs[lo:hi]
                scores[d] += self.weights[lo:hi]  # a term's rows are distinct, so fancy-index += adds each once
                hit[d] = True
        matched = np.flatnonzero(hit)
        if len(matched) == 0:
            return []
        n = min(n, len(matched))
        s = scores[matched]
        if n < len(matched):
            # argpartition may cut inside a tie: keep every row tied with the n-th score, then order by row
            top = matched[np.argpartition(-s, n - 1)[:n]]
            top = matched[s >= scores[top].min()]
        else:
            top = matched
        top = top[np.lexsort((self.rows[top], -scores[top]))][:n]
        return [(int(self.rows[i]), float(scores[i])) for i in top]
