"""Shared set-up of the compression tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig


@pytest.fixture
def tiny_chat_teacher(smollm2_gguf, tmp_path) -> tuple[Path, object]:
    """(directory, tokenizer): a tiny random Llama with SmolLM2's tokenizer and EOS, saved as a teacher
    for distillation recipes."""
    _, tok = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=49152, tie_embeddings=True, init_std=0.1,
                                  eos_token_id=tok.eos_token_id)  # fmt: skip
    save_pretrained(lmlab.Transformer(cfg), tok, tmp_path / "teacher")
    return tmp_path / "teacher", tok
