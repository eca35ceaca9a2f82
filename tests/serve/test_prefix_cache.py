"""Prefix caching: a prompt that starts like an earlier one prefills only the rest, and its answer is
still what lmlab.generate gives; the cache keeps its token budget, least recently used out first."""

from __future__ import annotations

import torch

import lmlab
from lmlab.generate import GenerationConfig
from lmlab.serve.engine import Engine, Request
from lmlab.serve.prefix_cache import PrefixCache, common_prefix
from tests.serve.test_engine import Collector


def _kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 1, n, 4), torch.randn(2, 1, n, 4)


def test_lookup_budget_and_lru():
    cache = PrefixCache(max_tokens=60, min_match=4)
    a, b = list(range(30)), list(range(100, 130))
    cache.add(a, *_kv(30))
    cache.add(b, *_kv(30))
    assert cache.lookup([0, 1, 2]) is None  # shorter than min_match
    n, k, _, _ = cache.lookup([*a, 7, 7])
    assert n == 30 and k.shape[2] == 30
    n, _, _, _ = cache.lookup(a)  # the whole prompt cached: its last token must still run
    assert n == 29
    cache.add(list(range(200, 230)), *_kv(30))  # over budget: b (least recently used) goes
    assert cache.tokens == 60 and cache.lookup(b) is None and cache.lookup(a) is not None
    assert common_prefix((1, 2, 3), [1, 2, 4]) == 2


def test_shared_prefix_is_reused_and_answers_equal_generate(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4).start()
    system = tok.encode("You are a helpful assistant who answers briefly and politely, always. " * 3)
    prompts = [system + tok.encode(q) for q in ("What is two plus two?", "Name a color.", "Say hello.")]
    try:
        for p in prompts:  # one after another: each later one finds the first's prefix
            c = Collector()
            engine.submit(Request(p, GenerationConfig(max_new_tokens=16), c, ignore_eos=True))
            assert c.done.wait(120) and c.failed is None
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=16, stop_token_ids=[]))[0]
            assert c.texts[0] == ref.text
        assert engine.m_prefix_tokens.value() >= 2 * len(system)
    finally:
        engine.close()


def test_prefix_kv_equals_a_fresh_prefill(tiny):
    model, tok = tiny
    from lmlab.generate.kv_cache import KVCache

    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog " * 4)])
    full, part = KVCache.for_model(model, 1, ids.shape[1]), KVCache.for_model(model, 1, ids.shape[1])
    n = ids.shape[1] // 2
    with torch.inference_mode():
        model(ids, kv_cache=full)
        model(ids[:, :n], kv_cache=part)
        model(ids[:, n:], kv_cache=part)  # the second half with the first as its past
    torch.testing.assert_close(part.k, full.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.v, full.v, rtol=1e-5, atol=1e-5)


def test_a_burst_sharing_a_system_prompt_prefills_it_once(tiny):
    """Prompts that arrive together and share a system prompt: the shared part runs once, the rest of
    every prompt in one forward (rows right-aligned, cached prefixes of different lengths, one prompt
    with nothing shared), and every greedy answer equals lmlab.generate on its own."""
    model, tok = tiny
    system = tok.encode("You are a helpful assistant who answers briefly and politely, always. " * 3)
    questions = ["What is two plus two?", "Name a color.", "Say hello to everybody in the room, one by one."]
    first = system + tok.encode("Tell me a story.")
    engine = Engine(model, tok, max_batch=8)
    c0 = Collector()
    engine.submit(Request(first, GenerationConfig(max_new_tokens=12), c0, ignore_eos=True))
    engine.start()
    try:
        assert c0.done.wait(120)  # `first` is now in the prefix cache
        prefills, reused = engine.m_prefills.value(), engine.m_prefix_tokens.value()
        prompts = [system + tok.encode(q) for q in questions] + [first + tok.encode(" More.")]
        prompts.append(tok.encode("Unrelated words with no system prompt in front of them at all."))
        cols = [Collector() for _ in prompts]
        with engine._cv:  # queued while the scheduler waits on the lock: one burst
            for p, c in zip(prompts, cols):
                engine.submit(Request(p, GenerationConfig(max_new_tokens=12), c, ignore_eos=True))
        for p, c in zip(prompts, cols):
            assert c.done.wait(120) and c.failed is None
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))[0]
            assert c.texts[0] == ref.text
        assert engine.m_prefills.value() - prefills == 1  # every prompt in one forward
        assert engine.m_prefix_tokens.value() - reused >= 3 * len(system)
    finally:
        engine.close()


def test_a_first_burst_caches_its_shared_prefix_first(tiny):
    """Nothing cached yet: the prefix the burst shares is prefilled once on its own (an unrelated prompt
    in the same burst does not stop the others from sharing), then the rest of every prompt in one
    forward; answers equal lmlab.generate."""
    model, tok = tiny
    system = tok.encode("You are a helpful assistant who answers briefly and politely, always. " * 3)
    prompts = [system + tok.encode(q) for q in ("Hi.", "Name a color, any color you like.", "Count to three.")]
    other = tok.encode("An unrelated prompt.")
    engine = Engine(model, tok, max_batch=4)
    cols = [Collector() for _ in range(4)]
    for p, c in zip([*prompts, other], cols):  # queued before the scheduler runs: one burst
        engine.submit(Request(p, GenerationConfig(max_new_tokens=12), c, ignore_eos=True))
    engine.start()
    try:
        for p, c in zip([*prompts, other], cols):
            assert c.done.wait(120) and c.failed is None
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))[0]
            assert c.texts[0] == ref.text
        assert engine.m_prefills.value() == 2  # the shared prefix, then the four rests together
        n = min(common_prefix(tuple(prompts[0]), p) for p in prompts[1:])
        rest = max(max(len(p) for p in prompts) - n, len(other))  # every row computes that many
        assert n >= len(system) - 1
        assert engine.m_prefix_tokens.value() == sum(max(0, len(p) - rest) for p in prompts)
    finally:
        engine.close()


def test_a_chats_next_turn_prefills_only_the_new_turn(tiny):
    """A finished answer's keys/values join the prefix cache (replacing its prompt's entry, which begins
    it): the next request, the conversation and a new turn, reuses all of it but the answer's last
    token (never fed back), and its answer is still what lmlab.generate gives. A cancelled request's
    are not kept."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4).start()
    cfg = GenerationConfig(max_new_tokens=12)
    turn = tok.encode("You are a helpful assistant who answers briefly. What is two plus two?")
    kept = 0
    try:
        for i in range(3):
            c = Collector()
            reused = engine.m_prefix_tokens.value()
            engine.submit(Request(turn, cfg, c, ignore_eos=True))
            assert c.done.wait(120) and c.failed is None
            ref = lmlab.generate(model, tok, turn, cfg.replace(stop_token_ids=[]))[0]
            assert c.texts[0] == ref.text
            if i:
                assert engine.m_prefix_tokens.value() - reused == kept, i
            kept = len(turn) + len(ref.token_ids) - 1
            assert list(engine.prefixes.entries) == [tuple(turn + ref.token_ids[:-1])]
            turn = turn + ref.token_ids + tok.encode(f" And {i} more?")
    finally:
        engine.close()


def test_an_entry_that_begins_a_new_one_gives_way_unless_it_has_states_the_new_one_lacks():
    cache = PrefixCache(max_tokens=100, min_match=4)
    a = list(range(20))
    cache.add(a, *_kv(20))
    cache.add([*a, 50, 51], *_kv(22))  # a begins it: replaced
    assert list(cache.entries) == [(*a, 50, 51)] and cache.tokens == 22
    cache.add([*a, 60], *_kv(21))  # a sibling, not an extension: both stay
    assert len(cache.entries) == 2 and cache.tokens == 43
    states = torch.randn(10, 8)
    cache.add(list(range(100, 110)), *_kv(10), states)
    cache.add([*range(100, 110), 7], *_kv(11))  # no states: the entry with them stays
    assert len(cache.entries) == 4 and cache.lookup([*range(100, 110), 3])[3] is not None
