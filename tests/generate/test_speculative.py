"""Speculative decoding keeps the target's output: exactly for greedy, in distribution for sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.speculative import (
    SpeculativeStats,
    acceptance_probability,
    residual,
    speculative_generate,
    speculative_rounds,
    truncated_draft,
)
from tests.generate.conftest import tiny_llama


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_the_targets(k):
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (7,)).tolist()
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate(target, None, prompt, cfg)[0].token_ids
    got, stats = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=k)
    assert got.token_ids == want
    assert stats.proposed > 0 and 0 <= stats.acceptance_rate <= 1


def test_a_perfect_draft_is_always_accepted():
    target = tiny_llama(0)
    prompt = torch.randint(0, 512, (5,)).tolist()
    got, stats = speculative_generate(
        target, target, None, prompt, GenerationConfig(max_new_tokens=16), 4, confidence=0, tree=None
    )
    assert stats.acceptance_rate == 1.0
    # every round yields its 4 drafts plus 1 free token: 5 + 5 + 5 + (1 draft + 1 free, cut to 16)
    assert stats.rounds == 4 and stats.generated == 16
    assert got.token_ids == generate(target, None, prompt, max_new_tokens=16)[0].token_ids


def test_rounds_yield_each_rounds_new_tokens_up_to_the_limit_or_eos():
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (7,)).tolist()
    cfg = GenerationConfig(max_new_tokens=13)
    want = generate(target, None, prompt, cfg)[0].token_ids
    stats = SpeculativeStats()
    modes: list[bool] = []  # every forward runs without autograd (a streamed caller sets no mode itself)
    for m in (target, draft):
        m.lm_head.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    chunks = list(speculative_rounds(target, draft, None, prompt, cfg, 3, 0.0, stats))
    assert [t for c in chunks for t in c] == want and stats.generated == 13
    assert modes and all(modes)
    assert len(chunks) == stats.rounds and all(1 <= len(c) <= 4 for c in chunks)
    eos = want[6]  # a token the answer holds: the stream ends with its first occurrence
    chunks = list(speculative_rounds(target, draft, None, prompt, cfg.replace(stop_token_ids=[eos]), 3, 0.0,
                                     SpeculativeStats()))  # fmt: skip
    assert [t for c in chunks for t in c] == want[: want.index(eos) + 1]


def test_truncated_draft_shares_weights_and_speaks_the_same_vocabulary():
    target = tiny_llama(0, n_layer=4)
    for bad in (0, 4):
        with pytest.raises(LmlabError, match=f"a draft of {bad} layers: the target has 4, so 1 to 3"):
            truncated_draft(target, bad)
    draft = truncated_draft(target, 2)
    assert draft.embed.weight is target.embed.weight and len(draft.layers) == 2
    prompt = torch.randint(0, 512, (6,)).tolist()
    got, _ = speculative_generate(target, draft, None, prompt, GenerationConfig(max_new_tokens=12), 3)
    assert got.token_ids == generate(target, None, prompt, max_new_tokens=12)[0].token_ids


def test_rejection_sampling_preserves_the_target_distribution_exactly():
    torch.manual_seed(0)
    for _ in range(20):
        p = torch.rand(10).pow(3).softmax(-1) if _ % 2 else torch.rand(10).softmax(-1)
        q = torch.rand(10) ** 4
        if _ % 3 == 0:  # a draft with a reduced head: no probability off its tokens
            q[torch.randperm(10)[:4]] = 0
        q = q / q.sum()
        # P(out = y) = sum_x q(x) [a(x) 1{y = x} + (1 - a(x)) r(y)]
        r = residual(p, q)
        out = torch.zeros(10, dtype=torch.float64)
        for x in range(10):
            a = acceptance_probability(p, q, x)
            out[x] += q[x] * a
            out += q[x] * (1 - a) * r.double()
        torch.testing.assert_close(out, p.double(), atol=1e-6, rtol=0)


def test_seeded_speculative_sampling_is_reproducible():
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (5,)).tolist()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3)
    a, _ = speculative_generate(target, draft, None, prompt, cfg)
    b, _ = speculative_generate(target, draft, None, prompt, cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_a_doubting_draft_proposes_fewer_tokens_and_the_output_stays():
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (7,)).tolist()
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate(target, None, prompt, cfg)[0].token_ids
    proposed = {}
    for c in (0.0, 0.05, 1.01):
        got, st = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=4, confidence=c, tree=None)
        assert got.token_ids == want
        proposed[c] = (st.proposed, st.rounds)
    # above 1 no guess is sure enough: one drafted token a round; 0 never stops early (4 a round)
    assert proposed[1.01][0] == proposed[1.01][1]
    assert proposed[0.0][0] > 3 * proposed[0.0][1]  # 4 a round but near the end (max_new_tokens cuts k)
    assert proposed[0.05][0] / proposed[0.05][1] <= proposed[0.0][0] / proposed[0.0][1]
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3)
    a, _ = speculative_generate(target, draft, None, prompt, sampled, confidence=0.3)
    b, _ = speculative_generate(target, draft, None, prompt, sampled, confidence=0.3)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("confidence", [0.0, 0.05])
def test_plain_greedy_takes_argmaxes_and_matches_the_general_rule(confidence):
    """Plain greedy compares argmaxes (a reduced-head draft's mapped back to the vocabulary); the
    general rule with one-hot distributions (taken when any processor is on: here a no-repeat n-gram
    longer than the text, which changes nothing) gives the same tokens, rounds and acceptances."""
    from lmlab.compress.draft import reduce_head

    target = tiny_llama(0)
    # the target itself with a head over 400 of its 512 tokens, listed out of vocabulary order: right
    # wherever the target's choice is among them, wrong elsewhere
    draft = reduce_head(copy.deepcopy(target), sorted(torch.randperm(512)[:400].tolist(), reverse=True))
    prompt = torch.randint(0, 512, (7,)).tolist()
    runs = {}
    for n in (0, 64):
        cfg = GenerationConfig(max_new_tokens=24, no_repeat_ngram_size=n)
        got, st = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3, confidence=confidence,
                                       tree=None)  # fmt: skip
        assert got.token_ids == generate(target, None, prompt, cfg)[0].token_ids
        runs[n] = (got.token_ids, st.accepted, st.proposed, st.rounds)
    assert runs[0] == runs[64] and 0 < runs[0][1] < runs[0][2]  # some drafts accepted, some not


def test_greedy_with_a_repetition_penalty_equals_the_targets():
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (7,)).tolist()
    cfg = GenerationConfig(max_new_tokens=20, repetition_penalty=1.5)
    want = generate(target, None, prompt, cfg)[0].token_ids
    assert want != generate(target, None, prompt, GenerationConfig(max_new_tokens=20))[0].token_ids
    got, _ = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3)
    assert got.token_ids == want


@pytest.mark.parametrize("plain_steps", [5, 60])
def test_an_eagle_draft_that_fell_behind_catches_up_on_the_targets_own_states(plain_steps):
    """Rounds, then plain steps the draft did not see (a server's), then rounds again: a short gap's states
    are computed again in full; a long one's only for the last RECOMPUTE_WINDOW tokens, the draft starting
    over there. Either way every state the draft reads is the target's at that position, and the tokens
    are the target's greedy ones."""
    from lmlab.compress.eagle import eagle_draft
    from lmlab.generate.kv_cache import KVCache
    from lmlab.generate.speculative import RECOMPUTE_WINDOW, Speculation

    target = tiny_llama(0)
    torch.manual_seed(1)
    draft = eagle_draft(target).eval()
    prompt = torch.randint(0, 512, (9,)).tolist()
    n = 8 + plain_steps + 12
    want = generate(target, None, prompt, GenerationConfig(max_new_tokens=n))[0].token_ids
    reads: list[tuple[int, torch.Tensor]] = []
    real_hidden = draft.hidden_states
    spec: Speculation

    def hidden(ids, kv_cache=None, features=None, **kw):
        if features is not None and len(ids[0]) > 1:  # a catch-up: these are the target's states
            reads.append((spec.base + kv_cache.length, features[0].clone()))
        return real_hidden(ids, kv_cache=kv_cache, features=features, **kw)

    draft.hidden_states = hidden
    cfg = GenerationConfig(max_new_tokens=n)
    spec = Speculation(target, draft, cfg, [], None, set(), len(prompt) + n + 8, 3, confidence=0.0)
    t_cache, seq = KVCache.for_model(target, 1, len(prompt) + n + 8), list(prompt)
    with torch.inference_mode():
        while len(seq) - len(prompt) < 8:
            seq += spec.round(seq, t_cache, n - (len(seq) - len(prompt)))
        for _ in range(plain_steps):  # plain steps: the target alone, one token each
            logits = target(torch.tensor([seq[t_cache.length :]]), kv_cache=t_cache, logits_to_keep=1)
            seq.append(int(logits[0, -1].argmax()))
        while len(seq) - len(prompt) < n:
            seq += spec.round(seq, t_cache, n - (len(seq) - len(prompt)))
        full = target.hidden_states(torch.tensor([seq]))[0]  # every position's state, from scratch
    assert seq[len(prompt) :] == want
    assert (spec.base > 0) == (plain_steps > RECOMPUTE_WINDOW)
    # it caught up after the plain steps: a read reaching past them (before them the text had <= 8 + 3 tokens)
    assert any(start + len(f) >= len(prompt) + 8 + plain_steps - 1 for start, f in reads)
    for start, f in reads:
        torch.testing.assert_close(f, full[start : start + len(f)], atol=1e-4, rtol=1e-4)
