"""Serving with a draft: a request decoding alone goes by speculative rounds and its greedy answer is still
the target's own, whatever path its draft state took (prefill, prefix cache, batched steps in between)."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest
import torch

import lmlab
from lmlab.compress.eagle import eagle_draft
from lmlab.generate import GenerationConfig, decode, speculative
from lmlab.generate.draft_tree import DEFAULT_TREE
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
    engine = Engine(model, tok, max_batch=4, draft=_draft(model, kind), draft_confidence=0.0, speculate="always")
    engine.start()
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


@pytest.mark.parametrize("tree", [DEFAULT_TREE, "dynamic"])
def test_lone_requests_over_a_candidate_tree_answer_as_generate(tiny, tree):
    """`draft_tree`: a lone greedy request's rounds check a tree of 6 candidates (static or dynamic) and
    answer as generate; an unseeded sampled request speculates over a static tree (a dynamic one's
    sampled rounds are the chain's)."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, "layers"), speculate="always", draft_tree=tree)
    engine.start()
    try:
        for p in (tok.encode("the"), tok.encode("Name a color.")):
            col = _run(engine, p, GenerationConfig(max_new_tokens=23), ignore_eos=True)
            assert col.texts[0] == _greedy(model, tok, p, 23)
        s = engine.spec_stats
        assert s.rounds > 0 and s.proposed == 6 * s.rounds and engine.m_drafted.value() == s.proposed
        before = (s.rounds, s.proposed)
        col = _run(engine, p, GenerationConfig(max_new_tokens=15, temperature=0.9), ignore_eos=True)
        assert col.usage.completion_tokens == 15 and s.rounds > before[0]
        assert ((s.proposed - before[1]) == 6 * (s.rounds - before[0])) == (tree == DEFAULT_TREE)
    finally:
        engine.close()


def _draft_guesses(model, tok, prompt, **engine_kw) -> list[int]:
    """The EAGLE draft's guess at each of its forwards for a lone greedy request (confidence 0: always 4)."""
    draft = _draft(model, "eagle")
    guesses: list[int] = []
    draft.lm_head.register_forward_hook(lambda m, i, out: guesses.extend(out.argmax(-1).flatten().tolist()))
    engine = Engine(model, tok, max_batch=2, draft=draft, draft_confidence=0.0, speculate="always", **engine_kw)
    engine.start()
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
    engine = Engine(model, tok, max_batch=2, draft=draft, draft_confidence=0.0, speculate="always").start()
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
    monkeypatch.setattr(speculative, "RECOMPUTE_WINDOW", 10**6)  # all of them (not only the last 32)
    assert _draft_guesses(model, tok, prompt, prefix_cache_tokens=0) == fresh


def _eager_graphs(monkeypatch) -> list[int]:
    """Compiled graphs stood in for by their uncompiled templates (a compile of each would take minutes in
    all): what compiled serving adds, static views and padded rounds, checked in seconds. Returns the
    widths of the rows graphs called (speculative rounds; a tree's as (width, "tree"))."""
    widths: list[int] = []

    def fake(model, batch, capacity, key=None, width=0, tree=False):
        def call(*a, **kw):
            if width:
                widths.append((width, "tree") if tree else width)
                return decode._rows_forward_plain(model, *a, **kw)
            return decode._forward_plain(model, *a, **kw)

        return call

    monkeypatch.setattr(decode, "compiled", fake)
    monkeypatch.setattr(decode, "_warming", {})
    return widths


def _record_reads(monkeypatch, draft) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
    """Records, at each round's start, the target states the draft reads there (first position, states), and
    after each round how many tokens it ran the target again for (`Speculation.recomputed`)."""
    from lmlab.generate.speculative import Speculation

    reads: list[tuple[int, torch.Tensor]] = []
    recomputed: list[int] = []
    real_round, real_hidden = Speculation.round, draft.hidden_states
    first_call: list = [None]  # the Speculation whose round just began

    def round_(self, seq, t_cache, budget):
        first_call[0] = self
        new = real_round(self, seq, t_cache, budget)
        recomputed.append(self.recomputed)
        return new

    def hidden(ids, kv_cache=None, features=None, **kw):
        if threading.current_thread().name == "lmlab-compile":  # a stand-in graph's warm-up call
            return real_hidden(ids, kv_cache=kv_cache, features=features, **kw)
        spec, first_call[0] = first_call[0], None
        if spec is not None and features is not None:
            start, n = kv_cache.length, len(features[0])
            if getattr(kv_cache, "static", False):  # a padded call: its real tokens from slots[0] to length
                start = int(kv_cache.slots[0])
                n = kv_cache.length - start
            reads.append((spec.base + start, features[0, :n].clone()))
        return real_hidden(ids, kv_cache=kv_cache, features=features, **kw)

    monkeypatch.setattr(Speculation, "round", round_)
    monkeypatch.setattr(draft, "hidden_states", hidden)
    return reads, recomputed


def _assert_target_states(model, prompt: list[int], tokens: list[int], reads) -> None:
    """Every state the draft read equals the target's own at that position, computed from scratch."""
    full = model.hidden_states(torch.tensor([prompt + tokens]))[0]  # (P + n, d), no cache
    for start, f in reads:
        torch.testing.assert_close(f, full[start : start + len(f)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compile", [False, True])
def test_lone_plain_steps_hand_their_states_to_the_eagle_draft(tiny, monkeypatch, compile):
    """A lone request whose steps go round, plain, plain, plain, round, ... (as auto mode may): each plain
    step keeps its final state for the EAGLE draft, so no round after the first runs the target again for
    states, every state read is the target's own, and the answer is generate's. Eager and (stand-in)
    compiled: there the plain step is the target's one-token rows graph."""
    model, tok = tiny
    widths = _eager_graphs(monkeypatch) if compile else []
    draft = _draft(model, "eagle")
    reads, recomputed = _record_reads(monkeypatch, draft)
    engine = Engine(model, tok, max_batch=2, draft=draft, draft_confidence=0.0, compile=compile)
    if compile and not engine.compile:
        pytest.skip("compiled serving needs lmlab's CPU kernels (AVX-512)")
    ways = iter([True, False, False, False] * 100)
    monkeypatch.setattr(engine.policy, "speculate", lambda: next(ways))
    engine.start()
    try:
        prompt = tok.encode("Once upon a time")
        if compile:  # the graphs' compiles first (stand-ins: at once), so that every plain step can use them
            _run(engine, tok.encode("hi"), GenerationConfig(max_new_tokens=3), ignore_eos=True)
            reads.clear(), recomputed.clear()
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=40), ignore_eos=True)
    finally:
        engine.close()
    want = lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=40, stop_token_ids=[]))[0]
    assert col.texts[0] == want.text and engine.m_steps.value() > 0
    assert len(recomputed) >= 8 and not any(recomputed)  # plain steps kept every state
    assert any(len(f) >= 4 for _, f in reads[1:])  # a catch-up over a round's tokens and 3 plain steps' states
    _assert_target_states(model, prompt, want.token_ids, reads)
    if compile:
        assert 1 in widths  # the plain steps as the one-token rows graph


@pytest.mark.parametrize("kind", ["eagle", "self"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("tree", [None, DEFAULT_TREE])
def test_a_sequence_goes_from_speculating_to_the_batch_and_back(tiny, kind, compile, tree, monkeypatch):
    """Request 0 speculates alone, runs in the batch while 1 and 2 do (plain steps; its draft falls
    behind), then speculates alone again, its draft catching up on the batch's tokens: every greedy
    answer is still generate's, and every target state an EAGLE draft read is the target's own state at
    that position, computed from scratch. With `compile`, the rounds' calls go through (stand-in) graphs of
    fixed width over a static view of the slot cache, and plain steps through the decode graphs. Over a
    candidate tree too: its check and key/value moves over the slot cache (or its static view)."""
    model, tok = tiny
    widths = _eager_graphs(monkeypatch) if compile else []
    draft = _draft(model, kind)
    reads, _ = _record_reads(monkeypatch, draft)
    engine = Engine(model, tok, max_batch=4, cache_columns=32, draft=draft, speculate="always", compile=compile,
                    draft_tree=tree)  # fmt: skip
    if compile and not engine.compile:
        pytest.skip("compiled serving needs lmlab's CPU kernels (AVX-512)")
    engine.start()
    try:
        prompts, max_new = _prompts(tok, 3), [60, 9, 7]
        cols = _staggered(engine, prompts, max_new)
        for p, m, c in zip(prompts, max_new, cols):
            assert c.failed is None and c.texts[0] == _greedy(model, tok, p, m)
        assert engine.m_spec_rounds.value() > 0 and engine.m_steps.value() > 0
        if compile:  # the check (4 drafted + 1, or a tree's 6 + 1) ran through its graph; plain steps through theirs
            assert (5 if tree is None else (7, "tree")) in widths and engine.m_compiled.value() > 0
        if tree is not None:
            assert engine.spec_stats.proposed == 6 * engine.spec_stats.rounds
        assert engine.running_requests == 0 and engine.cache.rows == 0
    finally:
        engine.close()
    if kind == "eagle":
        ids = lmlab.generate(model, tok, prompts[0], GenerationConfig(max_new_tokens=60, stop_token_ids=[]))[0]
        assert reads[0][0] == 0 and len(reads[0][1]) == len(prompts[0])  # the prompt's, from its prefill
        # back from the batch: a catch-up over more tokens than one round gives (at most 5), recomputed
        assert any(len(f) > 5 for _, f in reads[1:])
        _assert_target_states(model, prompts[0], ids.token_ids, reads)


def test_stop_strings_and_sampling(tiny):
    """A stop string that falls inside a round cuts the text as generate does; a sampled request without a
    seed speculates, a seeded one decodes plainly (its text must not depend on what ran beside it) and
    equals a server's without a draft; a logprobs request decodes plainly."""
    model, tok = tiny
    prompt = tok.encode("Once upon a time")
    whole = _greedy(model, tok, prompt, 20)
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    want = lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=20, stop=[stop]))[0].text
    seeded = GenerationConfig(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=4)
    plain = Engine(model, tok, max_batch=2).start()
    try:
        seeded_text = _run(plain, prompt, seeded, ignore_eos=True).texts[0]
    finally:
        plain.close()
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, "self"), draft_confidence=0.0, speculate="always")
    engine.start()
    try:
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=20, stop=[stop]))
        assert col.texts[0] == want and col.reasons[0] == "stop"
        rounds = engine.m_spec_rounds.value()
        assert rounds > 0
        col = _run(engine, prompt, seeded.replace(seed=None), ignore_eos=True)
        assert engine.m_spec_rounds.value() > rounds and col.usage.completion_tokens == 15
        rounds = engine.m_spec_rounds.value()
        assert _run(engine, prompt, seeded, ignore_eos=True).texts[0] == seeded_text
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=6), top_logprobs=2, ignore_eos=True)
        assert engine.m_spec_rounds.value() == rounds and col.texts[0] == _greedy(model, tok, prompt, 6)
    finally:
        engine.close()


def test_timeout_and_cancel_free_a_speculating_row(tiny):
    """A lone request decoding by rounds that times out or is cancelled leaves its row at the next step,
    and the next request (speculating from a fresh state) still answers as generate."""
    import threading

    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, "eagle"), speculate="always").start()
    try:
        col = Collector()
        engine.submit(Request(tok.encode("hello"), GenerationConfig(max_new_tokens=900), col, ignore_eos=True,
                              timeout=0.05))  # fmt: skip
        assert col.done.wait(60) and col.failed is not None and col.failed.status == 504
        col, started = Collector(), threading.Event()
        col.on_delta = lambda ev: started.set()
        req = engine.submit(Request(tok.encode("hello"), GenerationConfig(max_new_tokens=900), col, ignore_eos=True))
        assert started.wait(60)
        engine.cancel(req)
        after = _run(engine, tok.encode("hi there"), GenerationConfig(max_new_tokens=12), ignore_eos=True)
        assert after.texts[0] == _greedy(model, tok, tok.encode("hi there"), 12)
        assert engine.m_spec_rounds.value() > 0 and engine.running_requests == 0 and engine.cache.rows == 0
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["self", "eagle"])
def test_auto_mode_measures_both_ways_and_the_answer_stays(tiny, kind):
    """By default a lone row tries rounds, then plain steps, then keeps the faster (timed): whichever it
    takes (an EAGLE draft catching up after plain steps), the greedy answer is generate's, and the
    server reports the measured ratio."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, kind), draft_confidence=0.0).start()
    try:
        prompt = tok.encode("Once upon a time")
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=80), ignore_eos=True)
        assert col.texts[0] == _greedy(model, tok, prompt, 80)
        assert engine.policy.seen[True] >= 4 and engine.policy.seen[False] >= 4
        assert engine.m_spec_rounds.value() >= 4 and engine.m_steps.value() >= 4  # the measuring phase
        ratio = engine.policy.speedup()
        assert ratio is not None and ratio > 0
        assert f"lmlab_speculation_speedup {ratio}" in engine.registry.render()
    finally:
        engine.close()


@pytest.mark.parametrize("ready", [False, True])
def test_auto_mode_times_only_what_runs_as_it_will_once_compiled(tiny, monkeypatch, ready):
    """With compiled steps, a round or step that ran eagerly because its graph is still compiling is not
    timed (eager calls are not what either way costs once its graphs are built): while every compile is
    pending the policy records nothing (and keeps measuring, speculatively); once the graphs are there
    (stand-ins here) it records both ways. The answer is generate's either way."""
    model, tok = tiny

    class Pending:  # a compile that never finishes
        ready, failed = threading.Event(), None

    if ready:
        _eager_graphs(monkeypatch)
    else:
        monkeypatch.setattr(decode, "warmup", lambda *a, **k: Pending)
    engine = Engine(model, tok, max_batch=2, draft=_draft(model, "self"), draft_confidence=0.0, compile=True)
    if not engine.compile:
        pytest.skip("compiled serving needs lmlab's CPU kernels (AVX-512)")
    engine.start()
    try:
        prompt = tok.encode("Once upon a time")
        col = _run(engine, prompt, GenerationConfig(max_new_tokens=40), ignore_eos=True)
        assert col.texts[0] == _greedy(model, tok, prompt, 40)
        if ready:
            assert engine.policy.seen[True] >= 4 and engine.policy.seen[False] >= 4
        else:
            assert engine.policy.seen == {True: 0, False: 0} and engine.m_steps.value() == 0
            assert engine.m_spec_rounds.value() > 4  # still measuring: every step a round
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
    p = subprocess.run([*cmd[:-1], ":1", "--draft-tree", "0 11"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "tree candidate 11 has no parent 1" in p.stderr and len(p.stderr.strip().splitlines()) == 1
