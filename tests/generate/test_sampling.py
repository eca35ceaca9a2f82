"""Each logits processor equals its transformers counterpart on random logits (<= 1e-6)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from lmlab.generate import sampling


@pytest.fixture
def batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 12))
    ids[1, :3] = 0  # some left padding
    mask = (torch.arange(12)[None] >= torch.tensor([0, 3, 0, 0])[:, None]).long()
    return ids, torch.randn(4, 50) * 3, mask


def _same(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    assert (a[finite] - b[finite]).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: sampling.temperature(0.7), lambda: hf.TemperatureLogitsWarper(0.7)),
        (lambda: sampling.temperature(1.8), lambda: hf.TemperatureLogitsWarper(1.8)),
        (lambda: sampling.top_k(5), lambda: hf.TopKLogitsWarper(5)),
        (lambda: sampling.top_k(1), lambda: hf.TopKLogitsWarper(1)),
        (lambda: sampling.top_p(0.9), lambda: hf.TopPLogitsWarper(0.9)),
        (lambda: sampling.top_p(0.3), lambda: hf.TopPLogitsWarper(0.3)),
        (lambda: sampling.top_p(0.3, min_keep=3), lambda: hf.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
        (lambda: sampling.min_p(0.1), lambda: hf.MinPLogitsWarper(0.1)),
        (lambda: sampling.min_p(0.5, min_keep=2), lambda: hf.MinPLogitsWarper(0.5, min_tokens_to_keep=2)),
        (lambda: sampling.no_repeat_ngram(2), lambda: hf.NoRepeatNGramLogitsProcessor(2)),
        (lambda: sampling.no_repeat_ngram(3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
        (lambda: sampling.repetition_penalty(1.5), lambda: hf.RepetitionPenaltyLogitsProcessor(1.5)),
        (lambda: sampling.repetition_penalty(0.8), lambda: hf.RepetitionPenaltyLogitsProcessor(0.8)),
    ],
)
def test_processor_matches_transformers(batch, ours, theirs):
    ids, scores, _ = batch
    _same(ours()(ids, scores.clone()), theirs()(ids, scores.clone()))


def test_repetition_penalty_ignores_left_padding_like_transformers(batch):
    ids, scores, mask = batch
    pad = (mask != 0).int().argmax(dim=1)
    want = hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pad)(ids, scores.clone())
    _same(sampling.repetition_penalty(1.5, pad)(ids, scores.clone()), want)


def test_no_repeat_ngram_bans_something(batch):
    ids, scores, _ = batch
    ids[0, -1] = ids[0, 3]  # the last token occurred before: its follower is now banned for bigrams
    out = sampling.no_repeat_ngram(2)(ids, scores)
    assert torch.isinf(out[0, ids[0, 4]])


def test_presence_and_frequency_penalties_follow_openai():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[5, 5, 1, 2, 2, 2, 4]])  # prompt [5, 5]; generated 1, 2, 2, 2, 4
    out = sampling.presence_frequency_penalty(presence=0.5, frequency=0.25, prompt_len=2)(ids, scores)
    # logit -= presence * [count > 0] + frequency * count, over generated tokens only
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, -0.75, 0.0]]


def test_processors_run_in_transformers_order(batch):
    from lmlab.generate import GenerationConfig

    ids, scores, _ = batch
    cfg = GenerationConfig(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    ours = sampling.apply_processors(sampling.build_processors(cfg, 12, sampling=True), ids, scores.clone())
    theirs = scores.clone()
    for p in (
        hf.RepetitionPenaltyLogitsProcessor(1.2),
        hf.TemperatureLogitsWarper(0.7),
        hf.TopKLogitsWarper(10),
        hf.TopPLogitsWarper(0.8),
        hf.MinPLogitsWarper(0.05),
    ):
        theirs = p(ids, theirs)
    _same(ours, theirs)
