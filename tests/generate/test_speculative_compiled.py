"""Compiled speculative rounds (static caches, fixed-width padded calls) give the target's greedy tokens.

Most tests stand an eager function in for the compiled graph (`decode.compiled` patched), which checks
what the compiled path adds, the padding and the static caches, in seconds; one test compiles for real.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lmlab.compress.eagle import eagle_draft
from lmlab.generate import GenerationConfig, decode, generate
from lmlab.generate.draft_tree import DEFAULT_TREE
from lmlab.generate.speculative import speculative_generate, truncated_draft
from tests.generate.conftest import tiny_llama


@pytest.fixture
def eager_graphs(monkeypatch):
    """`decode.compiled` returns the rows template itself, uncompiled; records each call's (model, width)."""
    calls: list[tuple[int, int]] = []

    def fake(model, batch, capacity, key=None, width=0, tree=False):
        assert width, "only rows graphs are asked for here"

        def call(ids, **kw):
            assert ids.shape == (1, width)
            if tree:  # a candidate tree's call: its own mask over every column, and positions
                assert kw["tree_mask"].shape == (1, 1, width, capacity) and kw["position_ids"].shape == (1, width)
                calls.append((id(model), width, "tree"))
            else:
                assert kw["attention_mask"].shape == (1, capacity)
                calls.append((id(model), width))
            return decode._rows_forward_plain(model, ids, **kw)

        return call

    monkeypatch.setattr(decode, "compiled", fake)
    monkeypatch.setattr(decode, "_warming", {})
    return calls


def _drafts(target):
    torch.manual_seed(3)
    return {"eagle": eagle_draft(target).eval(), "layers": truncated_draft(target, 1), "self": target}


@pytest.mark.parametrize("kind", ["eagle", "layers", "self"])
@pytest.mark.parametrize("k", [1, 4])
def test_compiled_rounds_give_the_targets_greedy_tokens(eager_graphs, kind, k):
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    prompt = torch.randint(0, 512, (9,)).tolist()
    want = generate(target, None, prompt, GenerationConfig(max_new_tokens=30))[0].token_ids
    cfg = GenerationConfig(max_new_tokens=30, compile=True)
    # confidence 0.05: some rounds stop drafting early, so calls shorter than the graph's width are padded
    got, stats = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=k, confidence=0.05, tree=None)
    assert got.token_ids == want
    widths = {w for _, w in eager_graphs}
    assert (id(target), k + 1) in eager_graphs and widths <= {1, k + 1}
    if kind != "self":
        assert stats.proposed < stats.rounds * k or k == 1  # some rounds drafted fewer: padded checks


# (a random tiny model's distributions are flat: the perfect draft needs confidence 0 to draft more than one)
@pytest.mark.parametrize("kind, confidence", [("eagle", 0.05), ("layers", 0.05), ("self", 0.0)])
def test_padded_and_unpadded_rounds_agree_round_for_round(eager_graphs, kind, confidence):
    """The same rounds eager over dynamic caches and through padded static calls: equal tokens, and the
    draft guessed the same (a pad left in a cache would change what it reads, and its guesses)."""
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    prompt = torch.randint(0, 512, (6,)).tolist()
    runs = []
    for compile in (False, True):
        cfg = GenerationConfig(max_new_tokens=40, compile=compile)
        g, st = speculative_generate(
            target, draft, None, prompt, cfg, num_draft_tokens=3, confidence=confidence, tree=None
        )
        runs.append((g.token_ids, st.rounds, st.accepted, st.proposed))
    assert runs[0] == runs[1]
    assert runs[0][2] > 0 or kind == "eagle"  # (an untrained EAGLE draft guesses nothing right)
    assert any(
        m == id(draft) and w == 1 for m, w in eager_graphs
    )  # the draft's one-token steps ran through their graph too


def test_auto_runs_eagerly_until_the_graphs_are_ready(monkeypatch):
    """compile="auto": while the compiles run, the round's forwards run eagerly over the static caches."""
    target = tiny_llama(0)
    draft = _drafts(target)["layers"]

    class Pending:  # a compile that never finishes
        ready, failed = threading.Event(), None

    monkeypatch.setattr(decode, "warmup", lambda *a, **k: Pending)
    prompt = torch.randint(0, 512, (5,)).tolist()
    want = generate(target, None, prompt, GenerationConfig(max_new_tokens=12))[0].token_ids
    cfg = GenerationConfig(max_new_tokens=12, compile="auto")
    got, _ = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3)
    assert got.token_ids == want


def test_rounds_really_compiled_match():
    """One real compile of each graph (tiny models): the same greedy tokens as plain decoding."""
    target = tiny_llama(0, n_layer=2)
    torch.manual_seed(3)
    draft = eagle_draft(target).eval()
    prompt = torch.randint(0, 512, (7,)).tolist()
    want = generate(target, None, prompt, GenerationConfig(max_new_tokens=16))[0].token_ids
    cfg = GenerationConfig(max_new_tokens=16, compile=True)
    got, _ = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=2, confidence=0.0, tree=None)
    assert got.token_ids == want
    compiled = [k for k in decode._compiled if k[0] in (id(target), id(draft)) and k[4]]
    # the target's check (3 rows) and the draft's step (1 row); an untrained draft's catch-up is one token too
    assert {(k[0] == id(draft), k[4]) for k in compiled} >= {(False, 3), (True, 1)}
    # and with a candidate tree: its check (the newest token and 3 candidates) and the draft's call at depth 2
    got, _ = speculative_generate(target, draft, None, prompt, cfg, tree="0 1 00")
    assert got.token_ids == want
    compiled = [k for k in decode._compiled if k[0] in (id(target), id(draft)) and k[5]]
    assert {(k[0] == id(draft), k[4]) for k in compiled} == {(False, 4), (True, 1)}


def test_precompile_asks_for_the_graphs_an_answer_then_runs(pending_warmups):
    """`decode.precompile` and `speculative.precompile` (what a chat compiles while its user types) ask
    for the very graphs a plain or a speculative answer to a prompt of that length then looks up, for
    prompt lengths on both sides of a width boundary (64 columns: plain steps cross it at 57 prompt
    tokens + 8 new, rounds at 49 + 8 + 4 + 4 of room for a padded check, a tree's at 43 + 8 + 7 + 7)."""
    from lmlab.generate import speculative

    asked = pending_warmups
    target = tiny_llama(0)
    draft = truncated_draft(target, 1)
    cfg = GenerationConfig(max_new_tokens=8, compile="auto")
    widths, tree_widths, dynamic_widths = set(), set(), set()
    for n in range(40, 60):
        prompt = torch.randint(0, 512, (n,)).tolist()
        asked.clear()
        decode.precompile(target, n, cfg)
        want = set(asked)
        asked.clear()
        generate(target, None, prompt, cfg)
        assert set(asked) == want, n
        asked.clear()
        speculative.precompile(target, draft, n, cfg, 3, tree=None)
        want = set(asked)
        asked.clear()
        speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3, tree=None)
        # (the draft's catch-up graph is asked for only after a round it guessed all of)
        assert (id(target), 1, max(e[2] for e in want), 4) in asked and set(asked) <= want, n
        widths |= {e[2] for e in want}
        # the default candidate tree's graphs (a GPU's default): its check of 7 rows, the draft's calls per depth
        asked.clear()
        speculative.precompile(target, draft, n, cfg, 3, tree=DEFAULT_TREE)
        want = set(asked)
        asked.clear()
        speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3, tree=DEFAULT_TREE)
        assert (id(target), 1, max(e[2] for e in want), 7, "tree") in asked and set(asked) <= want, n
        tree_widths |= {e[2] for e in want}
        # a dynamic tree's: its check of 6 rows, the draft's calls of 4 (8 entries a round: more room)
        asked.clear()
        speculative.precompile(target, draft, n, cfg, 3, tree="dynamic:4,3,5")
        want = set(asked)
        asked.clear()
        speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3, tree="dynamic:4,3,5")
        assert (
            {(id(target), 1, max(e[2] for e in want), 6, "tree"), (id(draft), 1, max(e[2] for e in want), 4, "tree")}
            <= set(asked)
            <= want
        ), n
        dynamic_widths |= {e[2] for e in want}
    assert widths == tree_widths == dynamic_widths == {64, 128}
    asked.clear()
    assert decode.precompile(target, 50, cfg.replace(compile=True)) is None
    assert speculative.precompile(target, draft, 50, cfg.replace(compile=True), 3) == [] and not asked


@pytest.mark.parametrize("kind", ["eagle", "layers", "self"])
@pytest.mark.parametrize(
    "tree, temperature, graphs",
    [("0 1 2 00 01 10 000", 0.0, {("target", 8), ("draft", 2), ("draft", 1)}),  # draft calls at depths 2, 3
     ("0 1 2 00 01 10 000", 0.8, {("target", 8), ("draft", 2), ("draft", 1)}),  # sampled: the same graphs
     ("dynamic:4,3,5", 0.0, {("target", 6), ("draft", 4)})],  # the draft's 2 calls of 4 rows write 8 entries
)  # fmt: skip
def test_compiled_tree_rounds_agree_with_eager_ones_round_for_round(eager_graphs, kind, tree, temperature, graphs):
    """Candidate-tree rounds eager over dynamic caches and through static calls (the tree's own graphs:
    the check of the newest token and every candidate, the draft's call per depth): the same tokens
    (greedy: the target's greedy ones; sampled: the same seed's), rounds and accepted candidates both ways."""
    target = tiny_llama(0)
    draft = _drafts(target)[kind]
    prompt = torch.randint(0, 512, (6,)).tolist()
    want = generate(target, None, prompt, GenerationConfig(max_new_tokens=40))[0].token_ids
    runs = []
    for compile in (False, True):
        cfg = GenerationConfig(max_new_tokens=40, compile=compile, temperature=temperature, seed=5)
        g, st = speculative_generate(target, draft, None, prompt, cfg, tree=tree)
        runs.append((g.token_ids, st.rounds, st.accepted, st.proposed))
    assert runs[0] == runs[1] and (runs[0][0] == want) == (temperature == 0)
    assert runs[0][2] > 0 or kind == "eagle"
    ids = {"target": id(target), "draft": id(draft)}
    assert {c[:2] for c in eager_graphs if len(c) == 3} == {(ids[who], rows) for who, rows in graphs}
