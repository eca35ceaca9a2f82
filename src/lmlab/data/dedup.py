"""Deduplication: exact (hash of normalized text) and near (MinHash + LSH from datasketch, one kept per cluster)."""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from lmlab.data.language import words

_NON_WORD = re.compile(r"[\W_]+")
SCHEME = "affine32"  # datasketch 2.x: 32-bit affine permutations of 32-bit shingle hashes


def exact_key(text: str) -> bytes:
    """16-byte hash of text lowercased with punctuation and whitespace removed: copies that differ only there match."""
    return hashlib.blake2b(_NON_WORD.sub("", text.lower()).encode("utf-8"), digest_size=16).digest()


def _crc32(b: bytes) -> int:
    # crc32 is a fast C hash; Python's hash() is salted per process and would differ between workers
    return zlib.crc32(b)


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of lowercased text (Han characters count as words), as UTF-8 bytes."""
    ws = words(text.lower())
    if len(ws) < n:
        return {" ".join(ws).encode("utf-8")}
    return {" ".join(ws[i : i + n]).encode("utf-8") for i in range(len(ws) - n + 1)}


def minhash_signature(text: str, num_perm: int = 128, ngram: int = 3, seed: int = 1) -> np.ndarray:
    """MinHash signature (num_perm uint32 values) of a text's word n-gram shingles."""
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_crc32, scheme=SCHEME)
    m.update_batch(list(shingles(text, ngram)))
    return m.hashvalues


class ExactDedup:
    """Remembers the hash of every document seen; 16 bytes each."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_duplicate(self, key: bytes) -> bool:
        """True if this key was seen before; records it otherwise."""
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


class NearDedup:
    """MinHash LSH index: a document whose estimated Jaccard with a kept one reaches the threshold is dropped.

    Bands and rows come from datasketch's optimizer (`_optimal_param`), weighted 9:1 toward recall: its default finds
    only ~40% of pairs right at the threshold, this ~87% there and >97% above 0.85; every candidate is then confirmed
    by the signatures' Jaccard estimate, so a band collision alone drops nothing. The index itself is compact
    (one dict per band, band hash -> first kept document, plus a uint32 signature matrix, ~2 KB per kept document):
    datasketch's MinHashLSH keeps ~4.5 KB per document, which put cleaning 500 MB of text over 1 GB of memory.
    Only kept documents are indexed, so each cluster keeps its first document (in input order).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1) -> None:
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self.bands, self.rows = _optimal_param(threshold, num_perm, 0.1, 0.9)
        self.tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self.signatures = np.zeros((1024, num_perm), dtype=np.uint32)
        self.count = 0
        # random odd multipliers: a band's rows -> one 64-bit key (a multiply-add hash, wrapping mod 2**64)
        self._mult = np.random.default_rng(seed).integers(1, 2**63, size=self.rows, dtype=np.uint64) * 2 + 1

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (bands * self._mult).sum(axis=1, dtype=np.uint64).tolist()

    def check(self, signature: np.ndarray) -> int | None:
        """Index of the kept document this one duplicates, or None (then it is indexed as kept)."""
        signature = np.asarray(signature, dtype=np.uint32)
        keys = self._band_keys(signature)
        candidates = {t[k] for t, k in zip(self.tables, keys) if k in t}
        for doc in sorted(candidates):
            if np.count_nonzero(self.signatures[doc] == signature) / self.num_perm >= self.threshold:
                return doc
        doc = self.count
        if doc == len(self.signatures):  # grow by doubling: amortized O(1), no per-document objects
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[doc] = signature
        self.count += 1
        for t, k in zip(self.tables, keys):
            t.setdefault(k, doc)
        return None
