"""Deduplication: exact (hash of normalized text) and near (MinHash + LSH from datasketch, one kept per cluster)."""

from __future__ import annotations

import functools
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


@functools.cache  # the optimizer integrates over every split (~10 ms); the Ray engine makes a NearDedup per component
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) from datasketch's optimizer, weighted 9:1 toward recall (see NearDedup)."""
    return _optimal_param(threshold, num_perm, 0.1, 0.9)


def band_multipliers(rows: int, seed: int) -> np.ndarray:
    """Random odd 64-bit multipliers: a band's rows -> one 64-bit key (a multiply-add hash, wrapping mod 2**64)."""
    return np.random.default_rng(seed).integers(1, 2**63, size=rows, dtype=np.uint64) * 2 + 1


def band_keys(signatures: np.ndarray, bands: int, mult: np.ndarray) -> np.ndarray:
    """(n, bands) uint64 keys of (n, num_perm) signatures: documents sharing a key in some band are candidates."""
    rows = len(mult)
    x = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    with np.errstate(over="ignore"):
        return (x * mult).sum(axis=2, dtype=np.uint64)


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
    (one dict per band, band hash -> the kept documents with that hash, an int or, rarely, a list; plus a uint32
    signature matrix, ~2 KB per kept document): datasketch's MinHashLSH keeps ~4.5 KB per document, which put
    cleaning 500 MB of text over 1 GB of memory.

    The rule: a document is dropped when some earlier *kept* document shares a band with it and reaches the
    threshold; each cluster keeps its first document (in input order), and a chain A~B~C with A, C apart keeps A and
    C. A document's fate depends only on the documents it shares bands with (transitively), which is what lets the
    Ray engine run this same class on each connected component of band collisions separately, with identical results.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1, capacity: int = 1024) -> None:
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.signatures = np.zeros((max(1, capacity), num_perm), dtype=np.uint32)
        self.count = 0
        self._mult = band_multipliers(self.rows, seed)

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        return band_keys(signature[None], self.bands, self._mult)[0].tolist()

    def check(self, signature: np.ndarray) -> int | None:
        """Index of the kept document this one duplicates, or None (then it is indexed as kept)."""
        signature = np.asarray(signature, dtype=np.uint32)
        keys = self._band_keys(signature)
        candidates: set[int] = set()
        for t, k in zip(self.tables, keys):
            hit = t.get(k)
            if hit is not None:
                candidates.update(hit) if isinstance(hit, list) else candidates.add(hit)
        for doc in sorted(candidates):
            if np.count_nonzero(self.signatures[doc] == signature) / self.num_perm >= self.threshold:
                return doc
        doc = self.count
        if doc == len(self.signatures):  # grow by doubling: amortized O(1), no per-document objects
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[doc] = signature
        self.count += 1
        for t, k in zip(self.tables, keys):
            hit = t.get(k)
            if hit is None:
                t[k] = doc
            elif isinstance(hit, list):
                hit.append(doc)
            else:  # two kept documents that collide in a band without reaching the threshold: both stay candidates
                t[k] = [hit, doc]
        return None
