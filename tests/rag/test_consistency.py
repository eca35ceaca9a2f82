"""The SelfCheck-style detector: agreement arithmetic on fixed texts, and `lmlab generate --check-consistency`."""

from __future__ import annotations

import pytest
import torch

from lmlab.cli import main
from lmlab.rag.consistency import score_sentences


def test_agreeing_samples_score_low_and_made_up_sentences_high(encoder):
    answer = "The capital of France is Paris. It has 90 million bridges."
    samples = ["The capital of France is Paris. It has many bridges.", "Paris is the capital of France.",
               "The capital of France is Paris, on the Seine."]  # fmt: skip
    s = score_sentences(answer, samples, encoder)
    assert [x.text for x in s] == ["The capital of France is Paris.", "It has 90 million bridges."]
    assert s[0].score < 0.25 and s[1].score > s[0].score + 0.2
    same = score_sentences(answer, [answer, answer], encoder)
    assert all(x.semantic == pytest.approx(0, abs=1e-5) and x.lexical == 0 for x in same)
    assert score_sentences("", samples, encoder) == []


def test_generate_check_consistency_cli(tmp_path, smollm2_gguf, capsys):
    from lmlab.model import ModelConfig, Transformer, save_pretrained
    from lmlab.model.gguf import read_gguf_tokenizer

    tokenizer = read_gguf_tokenizer(smollm2_gguf)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_head=2, n_kv_head=1,
                                  d_ff=64, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(Transformer(cfg), tokenizer, tmp_path / "tiny")
    argv = ["generate", "--model", str(tmp_path / "tiny"), "--chat", "--prompt", "Hi", "--max-new-tokens", "12",
            "--check-consistency", "3", "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "consistency check over 3 samples" in out and "answer: " in out
