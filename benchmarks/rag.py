"""RAG index speed: indexing throughput (chunks/s) and query latency p50/p95 at 10k and 100k chunks, against bm25s
(BM25) and faiss-cpu flat inner-product search (dense) as references. Generation is not included.

.venv/bin/python benchmarks/rag.py                  # 10k and 100k chunks (a few minutes on 2 cores)
.venv/bin/python benchmarks/rag.py --sizes 10000    # quicker

Chunks are sentences of the Python documentation (`lmlab data fetch python-docs`) shuffled into 90-word passages.
Embedding 100k chunks with MiniLM takes hours on 2 cores, so the large indexes get seeded random unit vectors
(search cost does not depend on the values); the MiniLM indexing rate and query-encoding time are measured
separately on real text.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from lmlab.rag.documents import Document, read_documents
from lmlab.rag.encoder import PROBE, Encoder
from lmlab.rag.index import Index, fts_tokens, query_terms
from lmlab.rag.retrieve import IndexRetriever


class RandomEncoder:
    """Seeded random unit vectors per text (same text, same vector), with MiniLM's tokenizer for chunking."""

    def __init__(self, tokenizer, dim: int = 384) -> None:
        self.name, self.dim, self.tokenizer = f"random-{dim}", dim, tokenizer
        self.fingerprint = [round(float(x), 5) for x in self.encode([PROBE])[0, :8]]

    def encode(self, texts):
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def passages(n: int, seed: int = 0) -> list[Document]:
    """n documents of 90 words each, made of shuffled documentation sentences (each fits one 200-token chunk)."""
    rng = random.Random(seed)
    text = " ".join(d.text for d in read_documents(["python-docs"]))
    sentences = [s for s in re.split(r"(?<=\.)\s+", " ".join(re.sub(r"[=\-~*`:_]{2,}", " ", text).split()))
                 if 5 <= len(s.split()) <= 40]  # fmt: skip
    docs = []
    for i in range(n):
        words: list[str] = []
        while len(words) < 90:
            words += rng.choice(sentences).split()
        docs.append(Document(f"p{i}", " ".join(words[:90]), "synthetic"))
    return docs


def percentiles(times: list[float]) -> str:
    ms = np.asarray(times) * 1000
    return f"p50 {np.percentile(ms, 50):7.2f} ms  p95 {np.percentile(ms, 95):7.2f} ms"


def bench_size(n: int, tokenizer, queries: list[str], k: int = 5) -> None:
    enc = RandomEncoder(tokenizer)
    docs = passages(n)
    with tempfile.TemporaryDirectory() as tmp:
        index = Index.create(Path(tmp) / "bench.sqlite", enc)
        t = time.perf_counter()
        stats = index.add(docs, enc, batch_chunks=2048)
        secs = time.perf_counter() - t
        print(f"\n{stats.total_chunks:,} chunks: stored (chunk + FTS5 + vector, random vectors) at "
              f"{stats.total_chunks / secs:,.0f} chunks/s; file {Path(tmp, 'bench.sqlite').stat().st_size / 1e6:.0f} MB")  # fmt: skip
        r = IndexRetriever(index, enc)
        qvecs = enc.encode(queries)
        times = []
        for q in queries:
            t = time.perf_counter()
            index.bm25(q, k, engine="fts5")
            times.append(time.perf_counter() - t)
        print(f"  FTS5   bm25   {percentiles(times)} (SQLite's bm25(), no in-memory copy)")
        t = time.perf_counter()
        index.warm()  # vectors and BM25 postings read once per process, as a server or `rag eval` does
        print(f"  warm (vectors + BM25 postings into memory): {time.perf_counter() - t:.1f} s")
        for mode in ("bm25", "dense", "hybrid"):
            times = []
            for q, v in zip(queries, qvecs):
                t = time.perf_counter()
                if mode == "dense":
                    index.dense(v, k)
                else:
                    r.search(q, k, mode)
                times.append(time.perf_counter() - t)
            print(f"  lmlab {mode:6s} {percentiles(times)}")
        # references: bm25s on the same tokens, faiss flat inner product on the same vectors
        import bm25s
        import faiss

        bodies = [b for (b,) in index.db.execute("SELECT body FROM fts ORDER BY rowid")]
        ref = bm25s.BM25(method="robertson", k1=1.2, b=0.75)
        ref.index([fts_tokens(b) for b in bodies], show_progress=False)
        times = []
        for q in queries:
            terms = [t for t in query_terms(q) if t in ref.vocab_dict] or ["the"]
            t = time.perf_counter()
            ref.retrieve([terms], k=k, show_progress=False, n_threads=1)
            times.append(time.perf_counter() - t)
        print(f"  bm25s  bm25   {percentiles(times)}")
        _, vectors = index.vectors()
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        times = []
        for v in qvecs:
            t = time.perf_counter()
            flat.search(v[None], k)
            times.append(time.perf_counter() - t)
        print(f"  faiss  dense  {percentiles(times)}")
        index.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--embed-chunks", type=int, default=200, help="chunks embedded with MiniLM for the indexing rate")
    args = p.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    rng = random.Random(1)
    minilm = Encoder()
    docs = passages(args.embed_chunks, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        index = Index.create(Path(tmp) / "real.sqlite", minilm)
        t = time.perf_counter()
        stats = index.add(docs, minilm)
        secs = time.perf_counter() - t
        index.close()
    print(
        f"MiniLM indexing (chunk + embed + store): {stats.total_chunks / secs:.1f} chunks/s over {stats.total_chunks}"
    )
    queries = [" ".join(rng.sample(d.text.split(), 6)) for d in passages(args.queries, seed=3)]
    times = []
    for q in queries[:50]:
        t = time.perf_counter()
        minilm.encode([q])
        times.append(time.perf_counter() - t)
    print(f"MiniLM query encoding: {percentiles(times)} (add to dense and hybrid latencies below)")
    for n in args.sizes:
        bench_size(n, minilm.tokenizer, queries)


if __name__ == "__main__":
    main()
