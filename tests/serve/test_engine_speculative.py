"""Serving with a draft: a request decoding alone goes by speculative rounds and its greedy answer is still
the target's own, whatever path its draft state took (prefill, prefix cache, batched steps in between)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch

import lmlab
from lmlab.compress.eagle import eagle_draft
from lmlab.generate import GenerationConfig
from lmlab.generate.speculative import truncated_draft
from lmlab.serve.engine import Engine, Request
from tests.serve.conftest import running_server
from tests.serve.test_engine import Collector, _prompts, _staggered


def _draft(model, kind: str):
    torch.manual_seed(1)
    if kind == "eagle":  # random layer: it reads the target's states, and seldom guesses right
        return eagle_draft(model).eval()
    if kind == "layers":
        return truncated_draft(model, 1)
    return model  # the target itself: every guess is right, so whole rounds are accepted


def _greedy(model, tok, prompt: list[int], n: int) -> str:
    return lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=n, stop_token_ids=[]))[0].text


def _run(engine: Engine, prompt: list[int], config: GenerationConfig, **kw) -> Collector:
    col = Collector()
    engine.submit(Request(prompt, config, col, **kw))
    assert col.done.wait(120) and col.failed is None
    return col


@pytest.mark.parametrize("kind", ["eagle", "layers", "self"])
def test_lone_requests_decode_speculatively_and_answer_as_generate(tiny, kind):
    model, tok = tiny
    # confidence 0: the random model is never sure of a token, and a perfect draft should still propose 4
    engine = Engine(model, tok, max_batch=4, draft=_draft(model, kind), draft_confidence=0.0).start()
    try:
        system = tok.encode("You are a helpful assistant who answers briefly and politely, always. " * 2)
        for p in (tok.encode("the"), system + tok.encode("Name a color."), system + tok.encode("Say hi.")):
            col = _run(engine, p, GenerationConfig(max_new_tokens=23), ignore_eos=True)
            assert col.texts[0] == _greedy(model, tok, p, 23) and col.usage.completion_tokens == 23
        s = engine.spec_stats
        assert engine.m_spec_rounds.value() == s.rounds > 0 and engine.m_steps.value() == 0  # no plain steps
        assert engine.m_drafted.value() == s.proposed and engine.m_draft_ok.value() == s.accepted
        assert engine.m_prefix_tokens.value() > 0  # the third prompt's system part came from the prefix cache
        if kind == "self":  # 22 tokens after the prefill's first: 5 a round (4 accepted, 1 free), 2 in the last
            assert s.acceptance_rate == 1.0 and s.rounds == 3 * 5 and s.generated == 3 * 22
    finally:
        engine.close()


def _draft_guesses(model, tok, prompt, **engine_kw) -> list[int]:
    """The EAGLE draft's guess at each of its forwards for a lone greedy request (confidence 0: always 4)."""
    draft = _draft(model, "eagle")
    guesses: list[int] = []
    draft.lm_head.register_forward_hook(lambda m, i, out: guesses.extend(out.argmax(-1).flatten().tolist()))
    engine = Engine(model, tok, max_batch=2, draft=draft, draft_confidence=0.0, **engine_kw).start()
    try:
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=17), ignore_eos=True)
        assert col.texts[0] == _greedy(model, tok, prompt, 17)
    finally:
        engine.close()
    return guesses


def test_an_eagle_drafts_states_are_the_same_from_prefill_prefix_cache_or_recomputed(tiny, monkeypatch):
    """The draft reads the target's hidden state at every position: handed over from the prompt's prefill,
    partly from the prefix cache, or recomputed by the first round when nobody kept them. Its guesses
    (which depend on those states) come out the same each way."""
    model, tok = tiny
    system = tok.encode("Answer in one short sentence, and never use more words than needed, please. " * 2)
    prompt = system + tok.encode("What is the capital of France?")
    fresh = _draft_guesses(model, tok, prompt)
    assert len(fresh) > 10
    # the same prompt after another with the same system part: its first 30+ tokens' states come from the cache
    draft = _draft(model, "eagle")
    engine = Engine(model, tok, max_batch=2, draft=draft, draft_confidence=0.0).start()
    guesses: list[int] = []
    try:
        _run(engine, system + tok.encode("Hello."), GenerationConfig(max_new_tokens=2), ignore_eos=True)
        draft.lm_head.register_forward_hook(lambda m, i, out: guesses.extend(out.argmax(-1).flatten().tolist()))
        hit = engine.m_prefix_tokens.value()
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=17), ignore_eos=True)
        assert engine.m_prefix_tokens.value() - hit >= len(system) - 1
        assert col.texts[0] == _greedy(model, tok, prompt, 17)
    finally:
        engine.close()
    assert guesses == fresh
    monkeypatch.setattr(Engine, "_prompt_states", lambda *a: None)  # nothing handed over: the round recomputes
    assert _draft_guesses(model, tok, prompt, prefix_cache_tokens=0) == fresh


@pytest.mark.parametrize("kind", ["eagle", "self"])
def test_a_sequence_goes_from_speculating_to_the_batch_and_back(tiny, kind):
    """Request 0 speculates alone, runs in the batch while 1 and 2 do (plain steps; its draft falls
    behind), then speculates alone again (its draft catching up on the batch's tokens): every greedy
    answer is still generate's."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4, cache_columns=32, draft=_draft(model, kind)).start()
    try:
        prompts, max_new = _prompts(tok, 3), [60, 9, 7]
        cols = _staggered(engine, prompts, max_new)
        for p, m, c in zip(prompts, max_new, cols):
            assert c.failed is None and c.texts[0] == _greedy(model, tok, p, m)
        assert engine.m_spec_rounds.value() > 0 and engine.m_steps.value() > 0
        assert engine.running_requests == 0 and engine.cache.rows == 0
    finally:
        engine.close()


def test_sampling_is_seeded_and_logprobs_requests_decode_plainly(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, "self")).start()
    try:
        prompt = tok.encode("Once upon a time")
        cfg = GenerationConfig(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=4)
        a, b = (_run(engine, prompt, cfg, ignore_eos=True) for _ in range(2))
        assert a.texts[0] == b.texts[0] and a.usage.completion_tokens == 15
        rounds = engine.m_spec_rounds.value()
        assert rounds > 0
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=6), top_logprobs=2, ignore_eos=True)
        assert engine.m_spec_rounds.value() == rounds and col.texts[0] == _greedy(model, tok, prompt, 6)
    finally:
        engine.close()


def test_serve_with_a_draft_over_http_and_a_bad_draft_is_one_line(tiny, tiny_dir):
    model, tok = tiny
    with running_server(tiny_dir, "--no-compile", "--draft", ":1") as url:
        body = {"model": "tiny", "prompt": "The sky is", "max_tokens": 9, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == lmlab.generate(model, tok, "The sky is", max_new_tokens=9)[0].text
        metrics = httpx.get(f"{url}/metrics").text
        rounds = next(line for line in metrics.splitlines() if line.startswith("lmlab_speculative_rounds_total"))
        assert float(rounds.split()[-1]) > 0
    cmd = [sys.executable, "-m", "lmlab.cli", "serve", "--model", str(tiny_dir), "--draft", ":abc"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "want a checkpoint or :N" in p.stderr and len(p.stderr.strip().splitlines()) == 1
