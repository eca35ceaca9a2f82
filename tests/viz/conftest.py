"""Fixtures for the viz tests: SmolLM2 loaded once by lmlab and by transformers (eager attention)."""

from __future__ import annotations

import pytest
import torch

import lmlab


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_gguf, tmp_path_factory):
    """(lmlab model, tokenizer, transformers model with eager attention) of SmolLM2-135M-Instruct.

    transformers reads the weights lmlab wrote back (seconds) rather than dequantizing the GGUF file
    again; that both read the GGUF file alike is tests/model/test_real_checkpoints.py's job."""
    import transformers

    ours, tokenizer = lmlab.load_pretrained(smollm2_gguf)
    directory = lmlab.save_pretrained(ours, tokenizer, tmp_path_factory.mktemp("smollm2"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return ours, tokenizer, theirs.eval()


def spread(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Re-draw a tiny random model's weights wide enough that its attention is far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


SENTENCE = "The capital of France is Paris, and 中国的首都是北京。"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_pair):
    """(ids (1, T), transformers' outputs with attentions and hidden states) of SENTENCE: one forward for all."""
    _, tok, theirs = smollm2_pair
    ids = torch.tensor([tok.encode(SENTENCE)])
    with torch.no_grad():
        return ids, theirs(input_ids=ids, output_attentions=True, output_hidden_states=True)
