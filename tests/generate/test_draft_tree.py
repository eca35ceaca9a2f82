"""Candidate trees for speculative decoding (generate/draft_tree.py): the tree's shape and walk, the
target's tree-masked forward against plain forwards of each branch, and tree rounds against greedy."""

from __future__ import annotations

import copy

import pytest
import torch

import lmlab
from lmlab.compress.eagle import eagle_draft
from lmlab.compress.quantize import QuantConfig, quantize_model
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.draft_tree import DEFAULT_TREE, DraftTree, DynamicTree, attention_rows, parse_tree
from lmlab.generate.kv_cache import KVCache, StaticKVCache
from lmlab.generate.speculative import (
    acceptance_probability,
    default_tree,
    residual,
    speculative_generate,
    truncated_draft,
)
from lmlab.model.config import ModelConfig
from lmlab.utils.device import forced_policy, policy
from tests.generate.conftest import tiny_llama


def test_a_tree_is_ordered_parent_first_and_says_what_each_node_needs():
    tree = DraftTree.parse("00 1 0 000 01 2")
    assert tree.paths == ((0,), (1,), (2,), (0, 0), (0, 1), (0, 0, 0)) and str(tree) == DEFAULT_TREE
    assert tree.parents == [-1, -1, -1, 0, 0, 3] and tree.depth == 3 and len(tree) == 6
    assert tree.levels == [[0], [3]]  # the draft's calls: (0,) at depth 2, (0, 0) at depth 3
    assert tree.wanted(-1) == 3 and tree.wanted(0) == 2 and tree.wanted(3) == 1
    assert tree.ancestors(5) == [0, 3, 5]
    assert DraftTree.parse("0 0,12").paths == ((0,), (0, 12))
    # the draft's calls: (0,) sees itself; then (0, 0) sees (0,)'s entry and itself
    assert [r.tolist() for r in tree.level_rows] == [[[True]], [[True, True]]]
    rows = DraftTree.parse("0 1 00 10 000 100").level_rows
    assert [r.tolist() for r in rows] == [[[1, 0], [0, 1]], [[1, 0, 1, 0], [0, 1, 0, 1]]]


@pytest.mark.parametrize(
    "spec, match",
    [("", "at least one"), ("0 01x", "ranks as digits"), ("0 0", "twice"), ("0 11", "no parent 1")],
)
def test_a_bad_tree_says_which_candidate(spec, match):
    with pytest.raises(LmlabError, match=match):
        DraftTree.parse(spec)


def test_a_dynamic_tree_keeps_the_likeliest_candidates_with_their_ancestors():
    plan = DynamicTree(topk=2, depth=3, size=4)
    assert (plan.drafted, len(plan), plan.entries, plan.draft_widths) == (10, 4, 5, [2])
    assert DynamicTree(4, 3, 5).entries == 8  # the draft's two calls of 4 rows write more than the check
    scores = {(0,): -0.1, (1,): -2.0, (0, 0): -0.3, (0, 1): -2.5, (1, 0): -2.1, (1, 1): -4.0,
              (0, 0, 0): -0.4, (0, 0, 1): -3.0, (1, 0, 0): -2.2, (1, 0, 1): -5.0}  # fmt: skip
    tree = plan.select(scores)
    assert tree.paths == ((0,), (1,), (0, 0), (0, 0, 0))
    assert plan.select(dict(scores)) is tree  # one tree per shape: its masks are built once
    # a child as likely as its parent (its probability rounds to 1) comes after it; ties go shallow first
    tied = {(0,): -1.0, (1,): -1.0, (0, 0): -1.0, (1, 0): -3.0, (0, 0, 0): -1.0}
    assert DynamicTree(2, 3, 3).select(tied).paths == ((0,), (1,), (0, 0))
    # a draft's NaN logits (every score NaN: any order) still give a tree, never a child without its parent
    nan = float("nan")
    assert len(DynamicTree(2, 2, 2).select({(0, 0): nan, (1, 1): nan, (0,): nan, (1,): nan})) == 2


@pytest.mark.parametrize(
    "spec, match",
    [("dynamic:3,3", "dynamic:TOPK,DEPTH,SIZE"), ("dynamic:0,3,3", "topk is an integer >= 1"),
     ("dynamic:2,2,7", "drafts 6 candidates: it cannot check 7"), ("dynamicx", "dynamic:TOPK,DEPTH,SIZE")],
)  # fmt: skip
def test_a_bad_dynamic_tree_says_what_is_wrong(spec, match):
    with pytest.raises(LmlabError, match=match):
        parse_tree(spec)


def test_parse_tree_reads_static_and_dynamic_trees():
    assert parse_tree("dynamic") == DynamicTree() and str(DynamicTree()) == "dynamic:3,3,6"
    assert parse_tree("dynamic:2,4,7") == DynamicTree(2, 4, 7) == parse_tree(str(DynamicTree(2, 4, 7)))
    assert parse_tree(DEFAULT_TREE) == DraftTree.parse(DEFAULT_TREE)


def _dynamic_scores(draft, seq: list[int], plan: DynamicTree) -> dict[tuple[int, ...], float]:
    """EAGLE-2's expansion computed the slow way: each candidate's log-probability from a plain forward
    of the draft over the sequence and the candidate's path."""
    tokens: dict[tuple[int, ...], int] = {}
    scores: dict[tuple[int, ...], float] = {}

    def branch(parent):
        ids = seq + [tokens[parent[:i]] for i in range(1, len(parent) + 1)]
        logp = draft(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        top = logp.topk(plan.topk)
        for r, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            tokens[(*parent, r)], scores[(*parent, r)] = token, scores.get(parent, 0.0) + value

    branch(())
    level = list(scores)
    for _ in range(plan.depth - 1):
        expand = sorted(level, key=lambda p: (-scores[p], p))[: plan.topk]
        for p in expand:
            branch(p)
        level = [(*p, r) for p in expand for r in range(plan.topk)]
    return scores


@pytest.mark.parametrize("kind", ["layers", "self"])
def test_dynamic_rounds_score_each_candidate_as_a_plain_forward_of_its_path(kind, monkeypatch):
    """Every round's candidates and their scores (the draft's tree-masked calls over its cache) equal a
    plain forward of the draft over the sequence and each candidate's path."""
    from lmlab.generate.speculative import SpeculativeStats, speculative_rounds

    seen = []
    select = DynamicTree.select
    monkeypatch.setattr(
        DynamicTree, "select", lambda self, scores: (seen.append(dict(scores)), select(self, scores))[1]
    )
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    plan = DynamicTree(topk=3, depth=3, size=6)
    seq = torch.randint(0, 512, (6,)).tolist()
    cfg = GenerationConfig(max_new_tokens=24)
    for new in speculative_rounds(target, draft, None, seq, cfg, 4, 0.0, SpeculativeStats(), tree=plan):
        want = _dynamic_scores(draft, seq, plan)
        got = seen.pop(0)
        assert got.keys() == want.keys()
        torch.testing.assert_close(torch.tensor([got[p] for p in want]), torch.tensor(list(want.values())),
                                   rtol=0, atol=1e-4)  # fmt: skip
        seq = seq + new  # (not +=: the prompt list is the loop's own)
    assert not seen and len(seq) == 6 + 24


def test_the_walk_follows_the_targets_argmax_down_matching_children():
    tree = DraftTree.parse(DEFAULT_TREE)
    tokens = [7, 8, 9, 4, 5, 6]  # (0,) 7, (1,) 8, (2,) 9, (0,0) 4, (0,1) 5, (0,0,0) 6
    # rows: the newest token, then one per candidate; the target picks 7, then 5 after it, then 3
    best = [7, 5, 0, 0, 0, 3, 0]
    assert tree.walk(1, best, tokens) == ([0, 4], [7, 5, 3])
    assert tree.walk(1, [8, 0, 2, 0, 0, 0, 0], tokens) == ([1], [8, 2])  # (1,) has no children: then its row
    assert tree.walk(1, [1] * 7, tokens) == ([], [1])  # no first guess matched
    rows = tree.check_rows
    assert rows[1 + 5].nonzero().flatten().tolist() == [0, 1, 4, 6]  # (0,0,0): the root, (0,), (0,0), itself


def test_attention_rows_hide_what_comes_after_the_region_and_pads_see_something():
    m = attention_rows(3, torch.tensor([[True, False], [True, True]]), 8, 3)[0, 0]
    assert m[:2].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert m[2].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("static", [False, True])
def test_a_tree_masked_forward_equals_each_branch_run_alone_and_moved_entries_decode_on(static):
    """Every candidate's hidden state from one tree-masked call equals a causal forward of the sequence
    followed by that candidate's path (1e-5); after moving a path's keys/values next to the sequence,
    the next token's state equals a recompute."""
    model = tiny_llama(0)
    tree = DraftTree.parse("0 1 2 00 01 10 000")
    seq = torch.randint(0, 512, (9,)).tolist()
    tokens = torch.randint(0, 512, (len(tree),)).tolist()
    make = StaticKVCache if static else KVCache
    cache = make.for_model(model, 1, 64)
    with torch.no_grad():
        if static:
            cache.advance(8)
            model.hidden_states(torch.tensor([seq[:8]]), attention_mask=torch.ones(1, 64, dtype=torch.long),
                                kv_cache=cache)  # fmt: skip
            cols = 64
        else:
            model.hidden_states(torch.tensor([seq[:8]]), kv_cache=cache)
            cols = 8 + 1 + len(tree)
        mask = attention_rows(8, tree.check_rows, cols, 1 + len(tree))
        pos = torch.tensor([[8] + [8 + len(p) for p in tree.paths]])
        if static:
            cache.advance(1 + len(tree))
        h = model.hidden_states(torch.tensor([seq[8:] + tokens]), position_ids=pos, tree_mask=mask, kv_cache=cache)[0]
        for i in range(len(tree)):
            branch = seq + [tokens[a] for a in tree.ancestors(i)]
            ref = model.hidden_states(torch.tensor([branch]))[0, -1]
            torch.testing.assert_close(h[1 + i], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(h[0], model.hidden_states(torch.tensor([seq]))[0, -1], rtol=0, atol=1e-5)
        path = tree.ancestors(len(tree) - 1)  # (0, 0, 0): candidates 0, 3 and 6
        cache.move([9 + i for i in path], 9)
        cache.length = 9 + len(path)
        nxt = 123
        branch = seq + [tokens[a] for a in path] + [nxt]
        if static:
            cache.advance(1)
            step = model.hidden_states(torch.tensor([[nxt]]), kv_cache=cache,
                                       attention_mask=(torch.arange(64) < cache.length).long()[None])  # fmt: skip
        else:
            step = model.hidden_states(torch.tensor([[nxt]]), kv_cache=cache)
        torch.testing.assert_close(step[0, -1], model.hidden_states(torch.tensor([branch]))[0, -1], rtol=0, atol=1e-5)


def _drafts(target):
    torch.manual_seed(3)
    return {"eagle": eagle_draft(target).eval(), "layers": truncated_draft(target, 1), "self": target}


@pytest.mark.parametrize("kind", ["eagle", "layers", "self"])
@pytest.mark.parametrize(
    "tree", [DEFAULT_TREE, "0 1 00 01 10 11 000 0000", "dynamic", "dynamic:2,4,7", "dynamic:4,3,5"]
)
def test_tree_rounds_give_the_targets_greedy_tokens(kind, tree):
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    for n, budget in ((1, 25), (7, 25), (5, 3)):  # a one-token prompt; a budget smaller than a round's gain
        prompt = torch.randint(0, 512, (n,)).tolist()
        cfg = GenerationConfig(max_new_tokens=budget)
        want = generate(target, None, prompt, cfg)[0].token_ids
        got, stats = speculative_generate(target, draft, None, prompt, cfg, tree=tree)
        assert got.token_ids == want, (kind, n)
        assert stats.generated == budget
    if kind == "self" and not tree.startswith("dynamic"):  # the target as its own draft: a whole path of the deepest
        prompt = torch.randint(0, 512, (5,)).tolist()
        _, stats = speculative_generate(target, draft, None, prompt, GenerationConfig(max_new_tokens=20), tree=tree)
        depth = DraftTree.parse(tree).depth
        assert stats.accepted == stats.generated - stats.rounds and stats.rounds == -(-20 // (depth + 1))


def test_an_eos_inside_an_accepted_path_ends_the_answer():
    target = tiny_llama(0)
    prompt = torch.randint(0, 512, (5,)).tolist()
    free = generate(target, None, prompt, GenerationConfig(max_new_tokens=20))[0].token_ids
    eos = free[6]
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=[eos])
    want = generate(target, None, prompt, cfg)[0].token_ids
    got, _ = speculative_generate(target, target, None, prompt, cfg, tree=DEFAULT_TREE)
    assert got.token_ids == want and len(want) < 20


def test_recursive_rejection_without_replacement_preserves_the_target_distribution_exactly():
    """The rule sampled tree rounds apply at each node (`Speculation._accept_tree`): children drawn from q
    without replacement, each kept with probability min(1, p(x) / q(x)), p -> max(0, p - q) and q
    losing x after a rejection, and a sample of what p became if none is kept. Its output, summed over
    every ordered draw of up to 3 children, is p (also when q puts no mass on some tokens, or fewer
    than 3 tokens, as top-k leaves it)."""

    def output(p: torch.Tensor, q: torch.Tensor, children: int) -> torch.Tensor:
        if children == 0 or q.sum() == 0:
            return p
        out = torch.zeros_like(p)
        for x in range(len(q)):
            if q[x] == 0:
                continue
            a = acceptance_probability(p, q, x)
            rest = q.clone()
            rest[x] = 0
            rest = rest / rest.sum() if rest.sum() > 0 else rest
            out[x] += q[x] * a
            out += q[x] * (1 - a) * output(residual(p, q), rest, children - 1)
        return out

    torch.manual_seed(0)
    for i in range(12):
        p = torch.rand(6, dtype=torch.float64).pow(3).softmax(-1) if i % 2 else torch.rand(6, dtype=torch.float64)
        p = p / p.sum()
        q = torch.rand(6, dtype=torch.float64) ** 4
        q[torch.randperm(6)[: i % 5]] = 0  # a reduced head or top-k: no mass off some tokens
        q = q / q.sum()
        for children in (1, 2, 3):
            torch.testing.assert_close(output(p, q, children), p, atol=1e-12, rtol=0)


@pytest.mark.parametrize("top_k", [0, 2])
def test_sampled_tree_rounds_draw_from_the_targets_distribution(top_k):
    """Sampled rounds over the default tree, with a draft that often disagrees (another random model) on
    a 6-token vocabulary: the first two tokens of 1,200 answers against the target's exact joint
    distribution (Pearson's chi-squared test; the seeds are fixed, so the test is deterministic). With
    top-k 2 the root's third child is never drawn (dead) and rounds still give the target's tokens."""
    from scipy.stats import chi2

    from lmlab.generate.sampling import build_processors
    from lmlab.generate.speculative import Speculation

    target, draft = tiny_llama(0, vocab_size=6), tiny_llama(1, n_layer=1, vocab_size=6)
    prompt = [1, 2, 3, 4]

    def dist(ids: list[int]) -> torch.Tensor:
        z = target(torch.tensor([ids]))[0, -1].double()
        if top_k:
            z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
        return z.softmax(-1)

    with torch.inference_mode():
        first = dist(prompt)
        want = torch.stack([first[a] * dist([*prompt, a]) for a in range(6)])  # P(t1 = a, t2 = b)
        cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, top_k=top_k, compile=False)
        spec = Speculation(target, draft, cfg, build_processors(cfg, len(prompt), True),
                           torch.Generator().manual_seed(0), set(), 16, 4, 0.0, tree=DEFAULT_TREE)  # fmt: skip
        assert spec.tree == DraftTree.parse(DEFAULT_TREE)
        cache, n = spec.target_cache(16), 1200
        counts = torch.zeros(6, 6, dtype=torch.float64)
        for _ in range(n):
            cache.length = spec.d_cache.length = 0
            seq = list(prompt)
            while len(seq) < len(prompt) + 2:
                seq += spec.round(seq, cache, len(prompt) + 2 - len(seq))
            counts[seq[-2], seq[-1]] += 1
    assert spec.stats.accepted > 0 and spec.stats.accepted < spec.stats.proposed  # both sides of the rule ran
    possible = want > 0
    assert counts[~possible].sum() == 0  # never a token the target's top-k excludes
    stat = float(((counts - n * want)[possible] ** 2 / (n * want)[possible]).sum())
    assert chi2.sf(stat, int(possible.sum()) - 1) > 1e-3, stat


def test_seeded_sampled_tree_rounds_are_reproducible():
    target, draft = tiny_llama(0), tiny_llama(1, n_layer=1)
    prompt = torch.randint(0, 512, (5,)).tolist()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    (a, sa), (b, _) = (speculative_generate(target, draft, None, prompt, cfg, tree=DEFAULT_TREE) for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and sa.proposed == 6 * sa.rounds


@pytest.mark.parametrize("kind", ["eagle", "layers", "self"])
def test_greedy_tree_rounds_after_logits_processors_give_the_targets_tokens(kind):
    """Greedy decoding with a repetition penalty and a no-repeat-ngram rule over a static tree: each
    node's children are the draft's best processed scores, each check row's argmax is taken after the
    processors over that row's own prefix, and the answer is `generate`'s. The target as its own draft
    accepts whole paths."""
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    cfg = GenerationConfig(max_new_tokens=20, repetition_penalty=1.5, no_repeat_ngram_size=2)
    for seed in range(4):  # (a deep row's penalty over its own path shows up in some answers, not all)
        prompt = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = generate(target, None, prompt, cfg)[0].token_ids
        assert want != generate(target, None, prompt, GenerationConfig(max_new_tokens=20))[0].token_ids
        got, stats = speculative_generate(target, draft, None, prompt, cfg, tree=DEFAULT_TREE)
        assert got.token_ids == want and stats.proposed == 6 * stats.rounds, seed
        if kind == "self":
            assert stats.accepted == stats.generated - stats.rounds and stats.rounds == -(-20 // 4)


def test_dynamic_trees_keep_the_chain_with_sampling_or_processors():
    """A dynamic tree ranks candidates by the draft's raw probabilities: under sampling (it would bias
    the draws) and after logits processors, rounds are the chain's, token for token."""
    target = tiny_llama(0)
    draft = truncated_draft(target, 1)
    prompt = torch.randint(0, 512, (5,)).tolist()
    for cfg in (GenerationConfig(max_new_tokens=16, temperature=0.8, seed=3),
                GenerationConfig(max_new_tokens=16, repetition_penalty=1.3)):  # fmt: skip
        a, sa = speculative_generate(target, draft, None, prompt, cfg, tree="dynamic")
        b, sb = speculative_generate(target, draft, None, prompt, cfg, tree=None)
        assert a.token_ids == b.token_ids and (sa.rounds, sa.proposed) == (sb.rounds, sb.proposed)


def test_the_default_tree_is_the_gpu_policys_and_off_for_alibi():
    target = tiny_llama(0)
    q = copy.deepcopy(target)
    quantize_model(q, QuantConfig(bits=8))
    assert default_tree(target) is None and default_tree(q) is None  # a CPU: the chain
    with forced_policy(policy("cuda")):  # a GPU streams the weights once however many rows
        assert default_tree(target) == default_tree(q) == DraftTree.parse(DEFAULT_TREE)
        prompt = torch.randint(0, 512, (5,)).tolist()
        cfg = GenerationConfig(max_new_tokens=10)
        _, by_default = speculative_generate(target, target, None, prompt, cfg)
        _, tree = speculative_generate(target, target, None, prompt, cfg, tree=DEFAULT_TREE)
        assert (by_default.rounds, by_default.proposed) == (tree.rounds, tree.proposed) and tree.proposed % 6 == 0
    torch.manual_seed(0)
    alibi = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", pos="alibi", eos_token_id=None)).eval()
    prompt = torch.randint(0, 512, (5,)).tolist()
    cfg = GenerationConfig(max_new_tokens=10)
    _, with_tree = speculative_generate(alibi, truncated_draft(alibi, 1), None, prompt, cfg, 3, 0.0, tree=DEFAULT_TREE)
    _, chain = speculative_generate(alibi, truncated_draft(alibi, 1), None, prompt, cfg, 3, 0.0, tree=None)
    assert (with_tree.rounds, with_tree.proposed) == (chain.rounds, chain.proposed)


@pytest.mark.parametrize("kind", ["eagle", "layers"])
@pytest.mark.parametrize("compile", [False, True])
def test_tree_rounds_over_a_kept_conversation_give_greedy_and_keep_the_draft_state(kind, compile, pending_warmups):
    """Four turns of tree rounds over one PromptCache (a chat; compiled rounds run eagerly over the static
    caches here, their compiles never finishing): every answer is the target's greedy one, the target's
    kept keys/values are the conversation's, and turns after the first adopt the draft's state."""
    from lmlab.generate.kv_cache import PromptCache
    from lmlab.generate.speculative import SpeculativeStats, speculative_rounds

    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    past = PromptCache()
    prompt = torch.randint(0, 512, (7,)).tolist()
    cfg = GenerationConfig(max_new_tokens=12, compile="auto" if compile else False)
    for turn in range(4):
        want = generate(target, None, prompt, cfg.replace(compile=False))[0].token_ids
        had = past.draft is not None
        got = [t for new in speculative_rounds(target, draft, None, prompt, cfg, 3, 0.0, SpeculativeStats(), past,
                                               DEFAULT_TREE) for t in new]  # fmt: skip
        assert got == want and had == (turn > 0) and past.ids == prompt + got[:-1], turn
        prompt = prompt + got + torch.randint(0, 512, (4,)).tolist()
