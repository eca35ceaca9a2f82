"""Tiny checkpoints with real tokenizers, and small synthetic data sets a tiny model can learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmlab.model import ModelConfig, Transformer, load_pretrained, save_pretrained

POS = ["good", "great", "lovely", "excellent", "nice"]
NEG = ["bad", "awful", "terrible", "poor", "boring"]
NEU = ["table", "window", "paper", "chair", "river"]
FILL = ["the", "movie", "was", "really", "a", "day", "film", "story", "it", "is"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Label = the class of the one cue word in the sentence; skewed 3:2:1 like real sentiment sets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neutral"] * 3 + ["positive"] * 2 + ["negative"])
        cue = rng.choice({"positive": POS, "negative": NEG, "neutral": NEU}[label])
        words = rng.sample(FILL, 5)
        words.insert(rng.randrange(6), cue)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer BERT (d=32) with the real all-MiniLM tokenizer, as a Hugging Face directory."""
    _, tokenizer = load_pretrained(minilm_dir)
    cfg = ModelConfig.from_preset("bert-tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_head=2, d_ff=64,
                                  head="none", pooler=True)  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    save_pretrained(Transformer(cfg), tokenizer, out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smollm2_gguf) -> Path:
    """A 2-layer LLaMA (d=32) with SmolLM2's tokenizer and chat template."""
    from lmlab.model.gguf import read_gguf_tokenizer

    tokenizer = read_gguf_tokenizer(smollm2_gguf)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_head=2, n_kv_head=1,
                                  d_ff=64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-chat")
    save_pretrained(Transformer(cfg), tokenizer, out)
    return out


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sentiment")
    write_jsonl(root / "train.jsonl", sentiment_rows(384, 0))
    write_jsonl(root / "validation.jsonl", sentiment_rows(96, 1))
    write_jsonl(root / "test.jsonl", sentiment_rows(96, 2))
    return root
