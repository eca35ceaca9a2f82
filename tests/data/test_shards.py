"""Token shards (.bin + meta.json) and TokenDataset: EOS between documents, deterministic splits and windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import TokenDataset, tokenize_files
from lmlab.data.shards import token_dtype
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.train import train_tokenizer_files

SAMPLE = Path(__file__).parents[2] / "data" / "samples" / "sample.jsonl"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer_files([SAMPLE], 1000, out, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tokenize_files(tok_dir, [SAMPLE], out, val_fraction=0.1, seed=0, workers=2, progress=False)
    return out


def test_shards_hold_every_document_separated_by_eos(tok_dir, shards):
    meta = json.loads((shards / "meta.json").read_text())
    tok = load_tokenizer(tok_dir)
    assert meta["dtype"] == "uint16" and meta["eos_token_id"] == tok.eos_token_id
    train = np.fromfile(shards / "train.bin", dtype=np.uint16)
    val = np.fromfile(shards / "val.bin", dtype=np.uint16)
    assert len(train) == meta["splits"]["train"]["tokens"] and len(val) == meta["splits"]["val"]["tokens"]
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(texts)
    assert 0 < meta["splits"]["val"]["docs"] < 0.25 * len(texts)
    # decoding the train shard document by document gives back the train texts, in order
    docs = np.split(train, np.flatnonzero(train == tok.eos_token_id) + 1)[:-1]
    decoded = [tok.decode(d[:-1].tolist()) for d in docs]
    assert all(d[-1] == tok.eos_token_id for d in docs)
    assert set(decoded) <= set(texts) and len(decoded) == meta["splits"]["train"]["docs"]
    assert decoded[0] == texts[0] or texts[0] in [
        tok.decode(d[:-1].tolist()) for d in np.split(val, np.flatnonzero(val == tok.eos_token_id) + 1)[:-1]
    ]


def test_split_does_not_depend_on_workers(tok_dir, shards, tmp_path):
    tokenize_files(tok_dir, [SAMPLE], tmp_path, val_fraction=0.1, seed=0, workers=1, progress=False)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / f).read_bytes() == (shards / f).read_bytes()


def test_dtype_choice():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32 and token_dtype(151_936) == np.uint32


def test_random_windows_are_deterministic_and_resumable(shards):
    a = TokenDataset(shards, "train", block_size=16, batch_size=4, seed=3)
    batches = [a.get_batch() for _ in range(5)]
    x, y = batches[0]
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    b = TokenDataset(shards, "train", block_size=16, batch_size=4, seed=3)
    b.get_batch()
    b.get_batch()
    c = TokenDataset(shards, "train", block_size=16, batch_size=4, seed=3)
    c.load_state_dict(b.state_dict())  # resume after two batches
    for i in range(2, 5):
        assert (c.get_batch()[0] == batches[i][0]).all()
    other = TokenDataset(shards, "train", block_size=16, batch_size=4, seed=4).get_batch()[0]
    assert not (other == batches[0][0]).all()


def test_sequential_windows_cover_the_split_in_order(shards):
    d = TokenDataset(shards, "val", block_size=8, batch_size=2, mode="sequential")
    tokens = np.fromfile(shards / "val.bin", dtype=np.uint16)
    x, y = d.get_batch()
    assert x[0].tolist() == tokens[:8].tolist() and x[1].tolist() == tokens[8:16].tolist()
    assert y[0].tolist() == tokens[1:9].tolist()
    assert d[len(d)][0].tolist() == d[0][0].tolist()  # wraps around


def test_resume_state_mismatch_is_an_error(shards):
    from lmlab.errors import LmlabError

    state = TokenDataset(shards, seed=1, block_size=8).state_dict()
    with pytest.raises(LmlabError, match="seed"):
        TokenDataset(shards, seed=2, block_size=8).load_state_dict(state)


def test_cli_tokenize(tok_dir, tmp_path):
    from lmlab.cli import main

    out = tmp_path / "cli"
    assert main(["data", "tokenize", "--tokenizer", str(tok_dir), "--input", str(SAMPLE), "--out", str(out)]) == 0
    assert (out / "meta.json").exists() and (out / "train.bin").stat().st_size > 0
