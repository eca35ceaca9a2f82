"""SmolLM2-135M-Instruct (real weights): perplexity and MMLU choice log-likelihoods equal transformers'."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.eval.harness import run_multiple_choice
from lmlab.eval.perplexity import perplexity
from lmlab.eval.tasks import load_task
from tests.eval.test_multiple_choice import DOCS, reference_ll
from tests.eval.test_perplexity import hf_recipe

SAMPLE = Path(__file__).parents[2] / "data" / "samples" / "sample.jsonl"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return lmlab.load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def text():
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0])["text"][:1200]  # King James Bible, Genesis 1: real English prose


def test_overlapping_windows_give_lower_perplexity(smollm2, text):
    model, tok = smollm2
    ppl = [perplexity(model, tok, [text], max_length=128, stride=s)["perplexity"] for s in (128, 64, 32)]
    # no overlap: tokens early in a window see little context; overlapping windows give every token >= 64 tokens
    assert ppl[0] > 1.2 * ppl[1] and ppl[0] > 1.2 * ppl[2] > 1
    assert ppl[2] == pytest.approx(ppl[1], rel=0.05)  # past ~64 tokens of context the gain saturates on this text


def test_perplexity_and_choices_equal_transformers(smollm2, smollm2_gguf, text):
    import transformers

    model, tok = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ours = perplexity(model, tok, [text], max_length=128, stride=64)
    nll, n = hf_recipe(ref, tok.encode(text), 128, 64)
    assert ours["tokens"] == n
    assert ours["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)

    task = load_task("mmlu")
    r = run_multiple_choice(model, tok, task, DOCS, batch_size=4)
    for rec, doc in zip(r["records"], DOCS):
        ctx_ids = tok.encode(task.context(doc, []))
        expected = [reference_ll(ref, ctx_ids, tok.encode(" " + c, add_special_tokens=False)) for c in "ABCD"]
        assert rec["loglikelihoods"] == pytest.approx(expected, abs=1e-3)


def test_chat_generation_task_answers_and_equals_generate(smollm2):
    from lmlab.eval.harness import run_generation

    model, tok = smollm2
    task = load_task("chatterbot-en", max_new_tokens=24)
    docs = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."}], "lang": "en", "category": "geo"},
        {"messages": [{"role": "user", "content": "Hello, how are you?"},
                      {"role": "assistant", "content": "I am fine, thank you."}], "lang": "en", "category": "greet"},
    ]  # fmt: skip
    r = run_generation(model, tok, task, docs, batch_size=2, n_boot=10)
    prompts = [tok.apply_chat_template(d["messages"][:1], add_generation_prompt=True) for d in docs]
    direct = lmlab.generate(model, tok, [tok.encode(p, add_special_tokens=False) for p in prompts], max_new_tokens=24,
                            stop=["\n\n"])  # fmt: skip
    assert [x["prediction"] for x in r["records"]] == [g.text.strip() for g in direct]
    assert "Paris" in r["records"][0]["prediction"] and r["records"][0]["rougeL"] > 0
