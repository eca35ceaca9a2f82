"""Fixtures for eval tests: a tiny random llama saved once, loaded by lmlab and by transformers."""

from __future__ import annotations

import pytest
import torch

import lmlab
from tests.conftest import hf_tiny

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Question: what is the capital of France? Answer: Paris, the city of light.",
    "Mathematics: two plus two equals four; three times three equals nine.",
    "Astronomy studies stars, planets, galaxies and the history of the universe.",
] * 4


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(lmlab model, lmlab tokenizer, transformers model, directory) with the same random weights."""
    import transformers

    from lmlab.tokenizer.train import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300, progress=False)
    hf = hf_tiny("llama", vocab_size=320, max_position_embeddings=256)
    d = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(d / "hf")
    model, _ = lmlab.load_pretrained(d / "hf")
    out = lmlab.save_pretrained(model.eval(), tok, d / "model")
    ours, ours_tok = lmlab.load_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return ours.eval(), ours_tok, ref, out
