"""Greedy and beam search are token-identical to transformers' `generate` (tiny random models and SmolLM2)."""

from __future__ import annotations

import collections

import pytest
import torch
import transformers

import lmlab
from lmlab.generate import GenerationConfig, generate_ids
from lmlab.generate.decode import left_pad
from tests.conftest import hf_tiny

CONFIGS = {
    "greedy": GenerationConfig(max_new_tokens=24),
    "greedy-penalties": GenerationConfig(max_new_tokens=24, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "beam4": GenerationConfig(max_new_tokens=24, num_beams=4),
    "beam4-lp0.6-n2": GenerationConfig(max_new_tokens=24, num_beams=4, length_penalty=0.6, num_return_sequences=2),
    "beam4-early": GenerationConfig(max_new_tokens=24, num_beams=4, early_stopping=True, length_penalty=1.2),
}


def _hf_generate(hf, ids, mask, cfg, eos, pad, **extra):
    return hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        early_stopping=cfg.early_stopping,
        num_return_sequences=cfg.num_return_sequences,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        pad_token_id=pad,
        eos_token_id=eos,
        **extra,
    )


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny_pair(request, tmp_path_factory):
    hf = hf_tiny(request.param, vocab_size=128)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours, _ = lmlab.load_pretrained(path)
    torch.manual_seed(3)
    rows = [torch.randint(3, 128, (n,)).tolist() for n in (5, 11, 8)]
    ids, mask = left_pad(rows, 0)
    # make EOS a token these models really produce, so sequences end at different steps
    first = generate_ids(ours, ids, mask, GenerationConfig(max_new_tokens=24), eos=[], pad_id=0)[:, ids.shape[1] :]
    eos = collections.Counter(first[:, 4:].flatten().tolist()).most_common(1)[0][0]
    return ours, hf, ids, mask, eos


@pytest.mark.parametrize("name", CONFIGS)
def test_token_identical_to_transformers(tiny_pair, name):
    ours, hf, ids, mask, eos = tiny_pair
    cfg = CONFIGS[name]
    pad = 1
    got = generate_ids(ours, ids, mask, cfg, eos=[eos], pad_id=pad)
    want = _hf_generate(hf, ids, mask, cfg, eos, pad)
    assert got.tolist() == want.tolist()
    if name == "greedy":
        assert (got[:, ids.shape[1] :] == eos).any(), "EOS never happened: the test would not cover stopping"


def test_smollm2_greedy_and_beam_identical_to_transformers(smollm2_gguf):
    ours, tok = lmlab.load_pretrained(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "用一句话介绍北京。"]
    rows = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in questions
    ]
    ids, mask = left_pad(rows, tok.pad_token_id)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for cfg in (
        GenerationConfig(max_new_tokens=32),
        GenerationConfig(max_new_tokens=32, num_beams=4),
        GenerationConfig(max_new_tokens=32, num_beams=4, length_penalty=0.6),
    ):
        got = generate_ids(ours, ids, mask, cfg, eos=[eos], pad_id=pad)
        want = _hf_generate(hf, ids, mask, cfg, eos, pad)
        assert got.tolist() == want.tolist(), cfg
