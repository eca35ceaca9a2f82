"""Sentence embeddings on the real all-MiniLM-L6-v2 weights, against transformers' BertModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import lmlab
from lmlab.errors import LmlabError
from lmlab.finetune.embed import embed, read_texts, write_embeddings

# mixed English and Chinese, lengths deliberately out of order so that sorting by length must be undone
TEXTS = [
    "ok",
    "A man is eating a piece of bread while the sun sets slowly over the quiet harbour town.",
    "一个男人在吃东西。",
    "The fox jumps!",
    "中国的首都是北京，它有三千多年的历史。",
    "A man is eating food.",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    ours, tok = lmlab.load_pretrained(minilm_dir)
    theirs = transformers.BertModel.from_pretrained(minilm_dir).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    return ours, tok, theirs, their_tok


def _reference(theirs, their_tok, texts, max_length=512):
    enc = their_tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = theirs(**enc).last_hidden_state  # (B, T, d)
    mask = enc.attention_mask.unsqueeze(-1).float()
    last = enc.attention_mask.sum(-1) - 1
    return {
        "mean": ((hidden * mask).sum(1) / mask.sum(1)).numpy(),
        "cls": hidden[:, 0].numpy(),
        "last": hidden[torch.arange(len(texts)), last].numpy(),
    }


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mean_and_cls_pooling_match_transformers(minilm):
    ours, tok, theirs, their_tok = minilm
    want = _reference(theirs, their_tok, TEXTS)
    got = embed(ours, tok, TEXTS, pooling="mean")
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, _unit(want["mean"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(embed(ours, tok, TEXTS, pooling="cls"), _unit(want["cls"]), atol=1e-5, rtol=0)
    # unnormalized and "last" (the decoder choice) against the same reference states
    raw = embed(ours, tok, TEXTS, pooling="last", normalize=False)
    np.testing.assert_allclose(raw, want["last"], atol=1e-4, rtol=0)
    assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)


def test_batching_and_training_mode_do_not_change_results(minilm):
    ours, tok, _, _ = minilm
    one = embed(ours, tok, TEXTS, batch_size=1)  # no padding at all
    ours.train()  # dropout on: embed must switch it off, and restore the mode afterwards
    try:
        many = embed(ours, tok, TEXTS, batch_size=32)
        assert ours.training
    finally:
        ours.eval()
    np.testing.assert_allclose(one, many, atol=1e-5, rtol=0)
    np.testing.assert_allclose(embed(ours, tok, TEXTS, batch_size=4), many, atol=1e-5, rtol=0)
    # each text's row does not depend on its neighbours
    np.testing.assert_allclose(embed(ours, tok, TEXTS[::-1], batch_size=3)[::-1], many, atol=1e-5, rtol=0)


def test_truncation_matches_transformers(minilm):
    ours, tok, theirs, their_tok = minilm
    want = _reference(theirs, their_tok, TEXTS, max_length=8)
    np.testing.assert_allclose(embed(ours, tok, TEXTS, max_len=8), _unit(want["mean"]), atol=1e-5, rtol=0)
    assert embed(ours, tok, [], pooling="mean").shape == (0, 384)
    with pytest.raises(LmlabError, match="unknown pooling 'max'"):
        embed(ours, tok, TEXTS, pooling="max")


def test_read_texts(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_bytes("first line\r\n\n   \nsecond  line \n中文\n".encode())
    assert read_texts(txt) == ["first line", "second  line ", "中文"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "a", "id": 1}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert read_texts(jl) == ["a", "b"]
    jl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(LmlabError, match=r"t\.jsonl:2: text: missing field"):
        read_texts(jl)
    jl.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(LmlabError, match=r"t\.jsonl:1: text: expected a non-empty string"):
        read_texts(jl)
    jl.write_text('{"text": "a"\n')
    with pytest.raises(LmlabError, match=r"t\.jsonl:1: invalid JSON"):
        read_texts(jl)
    with pytest.raises(LmlabError, match=r"\.csv: expected a \.txt file"):
        read_texts(tmp_path / "t.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LmlabError, match="no texts in this file"):
        read_texts(tmp_path / "empty.txt")


def test_write_embeddings_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "emb.npy"
    first = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_embeddings(first, out)
    np.testing.assert_array_equal(np.load(out), first)

    def broken_save(f, arr):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(first * 2, out)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out), first)  # the old file is untouched
    assert [p.name for p in out.parent.iterdir()] == ["emb.npy"]  # and no temp file is left behind
    with pytest.raises(LmlabError, match=r"written as \.npy"):
        write_embeddings(first, tmp_path / "emb.bin")
