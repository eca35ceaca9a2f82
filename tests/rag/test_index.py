"""The index: BM25 equal to bm25s, dense scores equal to sentence-transformers' cosine, incremental updates equal to a
fresh build, and a killed run that leaves a consistent index."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import bm25s
import numpy as np
import pytest
import torch
import transformers

from lmlab.rag.documents import Document, read_documents
from lmlab.rag.index import Index, build_index, fts_tokens, query_terms
from lmlab.rag.retrieve import IndexRetriever

from .conftest import DOCS, write_corpus

QUERIES = ["how hot should the water be for green tea", "tyre pressure of a road bike", "largest active volcano",
           "what does the waggle dance tell", "castling rules check king", "wild yeast starter flour"]  # fmt: skip


def _all_results(index_path, encoder, k=50):
    """Every mode's (chunk_id, score) lists for QUERIES: what two indexes must agree on."""
    with Index(index_path) as index:
        r = IndexRetriever(index, encoder)
        return {(q, m): [(h.chunk_id, round(h.score, 5)) for h in r.search(q, k, m)] for q in QUERIES
                for m in ("bm25", "dense", "hybrid")}  # fmt: skip


def test_fts5_bm25_equals_bm25s(small_index):
    with Index(small_index) as index:
        rows = list(index.db.execute("SELECT rowid, body FROM fts ORDER BY rowid"))
        corpus = [fts_tokens(body) for _, body in rows]
        # the same tokenization: FTS5's own token list of each chunk (fts5vocab) is what fts_tokens gives
        index.db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, fts, instance)")
        stored: dict[int, list[tuple[int, str]]] = {}
        for term, doc, offset in index.db.execute("SELECT term, doc, offset FROM temp.vocab"):
            stored.setdefault(doc, []).append((offset, term))
        assert [[t for _, t in sorted(stored[r])] for r, _ in rows] == corpus
        ref = bm25s.BM25(method="robertson", k1=1.2, b=0.75, dtype="float64")
        ref.index(corpus, show_progress=False)
        for q in QUERIES:
            terms = [t for t in query_terms(q) if any(t in c for c in corpus)]
            # bm25s' Robertson term-frequency part leaves out BM25's (k1 + 1) factor: a constant, so ranks are equal
            want = ref.get_scores(terms) * (1.2 + 1)
            got = np.zeros(len(rows))
            pos = {r: i for i, (r, _) in enumerate(rows)}
            hits = index.bm25(q, len(rows))
            for r, s in hits:
                got[pos[r]] = s
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-5)  # FTS5 floors idf <= 0 at 1e-6, bm25s at 0
            order = [r for r, _ in hits]
            assert order == [rows[i][0] for i in sorted(np.flatnonzero(want > 0), key=lambda i: (-want[i], rows[i][0]))]


def test_dense_scores_equal_sentence_transformers_cosine(small_index, encoder, minilm_dir):
    bert = transformers.BertModel.from_pretrained(minilm_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)

    def st_embed(texts):  # sentence-transformers' all-MiniLM-L6-v2 pipeline: max 256 tokens, mean pool, normalize
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = bert(**enc).last_hidden_state
        m = enc.attention_mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    with Index(small_index) as index:
        ids, bodies = zip(*index.db.execute("SELECT chunk_id, body FROM chunks JOIN fts ON fts.rowid = chunks.id"))
        docs = st_embed(list(bodies))
        r = IndexRetriever(index, encoder)
        for q in QUERIES[:3]:
            want = docs @ st_embed([q])[0]
            hits = r.search(q, len(ids), "dense")
            got = {h.chunk_id: h.score for h in hits}
            np.testing.assert_allclose([got[i] for i in ids], want, atol=1e-5, rtol=0)
            assert [h.chunk_id for h in hits][:3] == [ids[i] for i in np.argsort(-want)[:3]]
            assert hits[0].why["dense"]["rank"] == 1


def test_incremental_add_update_delete_equals_fresh_build(tmp_path, encoder, small_index):
    root = write_corpus(tmp_path / "notes")
    inc = tmp_path / "inc.sqlite"
    names = sorted(DOCS)
    build_index([root / n for n in names[:3]], inc, encoder, chunk_tokens=16, overlap=4)
    extra = write_corpus(tmp_path / "extra", {"junk.md": "# Junk\n\nTemporary text about green tea and bikes.\n"})
    build_index([extra / "junk.md"], inc, encoder)  # settings come from the index
    (root / names[0]).write_text("# Old\n\nA draft that will be replaced.\n")
    build_index([root / names[0]], inc, encoder)
    write_corpus(root)  # restore the original text: the document is updated again
    stats = build_index([root], inc, encoder)
    assert (stats.added, stats.updated, stats.unchanged) == (3, 1, 2)
    stats = build_index([], inc, delete=["junk.md"])
    assert stats.deleted == 1 and stats.total_docs == len(DOCS)
    assert build_index([root], inc, encoder).unchanged == len(DOCS)  # nothing to redo
    assert _all_results(inc, encoder) == _all_results(small_index, encoder)
    with Index(inc) as a, Index(small_index) as b:
        q = 'SELECT chunk_id, heading, text, start, "end", vector FROM chunks ORDER BY chunk_id'
        assert list(a.db.execute(q)) == list(b.db.execute(q))


def _consistent(path) -> tuple[int, int]:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n_docs, n_chunks = db.execute("SELECT count(*), coalesce(sum(n_chunks), 0) FROM docs").fetchone()
    assert n_chunks == db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert n_chunks == db.execute("SELECT count(*) FROM fts").fetchone()[0]
    assert db.execute("SELECT count(*) FROM chunks WHERE id NOT IN (SELECT rowid FROM fts)").fetchone()[0] == 0
    db.close()
    return n_docs, n_chunks


def test_killed_indexing_run_leaves_a_consistent_index(tmp_path, encoder, small_index, corpus):
    out = tmp_path / "killed.sqlite"
    # a child process that dies (os._exit: no cleanup, like SIGKILL) halfway through its second batch's transaction
    script = textwrap.dedent(f"""
        import os
        from lmlab.rag import index as ix
        calls = 0
        real_execute_chunk = ix.Index._delete_chunks
        def dying(self, doc_id):
            global calls
            calls += 1
            if calls == 4:  # batches hold 2 documents: this is inside the second transaction
                os._exit(9)
            return real_execute_chunk(self, doc_id)
        ix.Index._delete_chunks = dying
        real_add = ix.Index.add
        ix.Index.add = lambda self, docs, enc, **kw: real_add(self, docs, enc, batch_chunks=1)
        ix.build_index([{str(corpus)!r}], {str(out)!r}, chunk_tokens=16, overlap=4)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    n_docs, _ = _consistent(out)
    assert 0 < n_docs < len(DOCS)  # the first batch is in, the second rolled back
    stats = build_index([corpus], out, encoder)
    assert stats.unchanged == n_docs and stats.added == len(DOCS) - n_docs
    _consistent(out)
    assert _all_results(out, encoder, k=5) == _all_results(small_index, encoder, k=5)


def test_bad_inputs_write_nothing(tmp_path, encoder, small_index):
    out = tmp_path / "new.sqlite"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\ncaf\xe9 au lait\n")
    good = write_corpus(tmp_path / "ok")
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match=r"bad\.txt:2: not UTF-8"):
        build_index([good, bad], out, encoder)
    assert not out.exists()  # every input is read before the index file is touched
    with pytest.raises(LmlabError, match="chunk_tokens must be at least 8"):
        build_index([good], out, encoder, chunk_tokens=4)
    assert not out.exists()
    before = small_index.read_bytes()
    with pytest.raises(LmlabError, match="built with chunk_tokens 16"):
        build_index([good], small_index, encoder, chunk_tokens=32)
    with pytest.raises(LmlabError, match=r"no document with id 'nope\.md'"):
        build_index([], small_index, delete=["tea.md", "nope.md"])
    assert small_index.read_bytes() == before  # the delete of tea.md was rolled back with the bad id
    assert read_documents([good])[0].doc_id == "bees.md"
    assert isinstance(read_documents([good])[0], Document)


def test_index_built_with_another_encoder_is_refused(tmp_path, encoder, capsys):
    from lmlab.cli import main
    from lmlab.errors import LmlabError
    from lmlab.model import ModelConfig, Transformer, save_pretrained
    from lmlab.rag.encoder import Encoder

    cfg = ModelConfig.from_preset("bert-tiny", vocab_size=encoder.tokenizer.vocab_size, d_model=32, n_head=2,
                                  d_ff=64, head="none")  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(Transformer(cfg), encoder.tokenizer, tmp_path / "tiny-bert")
    out = tmp_path / "tiny.sqlite"
    corpus = write_corpus(tmp_path / "notes")
    build_index([corpus], out, Encoder(str(tmp_path / "tiny-bert")))
    with Index(out) as index:
        assert IndexRetriever(index).search("tea", 2, "dense")[0].doc_id  # its own encoder, from the index's meta
        with pytest.raises(
            LmlabError,
            match=r"built with embedding model '.*tiny-bert' \(dim 32\), but this run uses 'all-minilm-l6-v2' \(dim 384\)",
        ):
            IndexRetriever(index, encoder).search("tea", 2, "hybrid")
    before = out.read_bytes()
    assert main(["rag", "index", str(corpus), "--out", str(out), "--encoder", "all-minilm-l6-v2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny.sqlite: built with embedding model" in err
    assert out.read_bytes() == before


def _index(path, docs, encoder):
    index = Index.create(path, encoder)
    index.add(docs, encoder)
    return index


def test_in_memory_bm25_equals_fts5(small_index, tmp_path, encoder):
    """The in-memory postings (rag/sparse.py) give FTS5's own scores and order, ties by row included."""
    with Index(small_index) as index:
        index.warm()
        n = index.counts()[1]
        for q in [*QUERIES, "tea tea water", "the", "zzz unknownword"]:
            want = index.bm25(q, n, engine="fts5")
            got = index.bm25(q, n)
            assert [r for r, _ in got] == [r for r, _ in want], q
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-12, atol=0)
            assert index.bm25(q, 3) == got[:3]
        assert index._sparse  # the mirror agreed with FTS5: the in-memory path was the one measured
    # ties: identical chunks score the same and come back by row, also when k cuts inside the tie
    docs = [Document(f"d{i}", "green tea water" if i % 2 else "black coffee water", "t") for i in range(9)]
    with _index(tmp_path / "ties.sqlite", docs, encoder).warm() as index:
        for k in (1, 2, 4, 9):
            assert index.bm25("water tea", k) == index.bm25("water tea", k, engine="fts5")


def test_bm25_falls_back_to_fts5_where_python_tokens_differ(tmp_path, encoder):
    """A private-use character is a token character to FTS5's unicode61 but a separator to the Python mirror:
    the document lengths disagree, so BM25 stays FTS5's."""
    docs = [Document("a", "kettle\ue000steam boils water", "t"), Document("b", "cold water from the tap", "t")]
    with _index(tmp_path / "pua.sqlite", docs, encoder).warm() as index:
        assert index.bm25("water", 5) == index.bm25("water", 5, engine="fts5")
        assert index._sparse is False


def test_another_writer_invalidates_the_in_memory_copies(tmp_path, encoder):
    path = tmp_path / "kb.sqlite"
    _index(path, [Document("a", "green tea with hot water", "t")], encoder).close()
    with Index(path).warm() as reader:
        assert len(reader.bm25("water", 5)) == 1 and len(reader.vectors()[0]) == 1
        _index(path, [Document("b", "boiling water for pasta", "t")], encoder).close()  # another connection
        assert len(reader.bm25("water", 5)) == 2 and len(reader.vectors()[0]) == 2
