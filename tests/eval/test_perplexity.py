"""Perplexity: the sliding window equals the Hugging Face recipe on transformers, and more context lowers it."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.eval.perplexity import perplexity, window_nlls


def hf_recipe(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The transformers documentation's perplexity loop (labels -100 outside the new tokens)."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_length, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())  # labels shift inside the model
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq.size(1):
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize(("max_length", "stride"), [(64, 64), (64, 16), (100, 37)])
def test_window_nll_equals_transformers(tiny_pair, max_length, stride):
    ours, _, ref, _ = tiny_pair
    ids = torch.randint(0, 320, (250,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = window_nlls(ours, ids, max_length, stride)
    nll, n = sum(w[0] for w in windows), sum(w[1] for w in windows)
    ref_nll, ref_n = hf_recipe(ref, ids, max_length, stride)
    assert n == ref_n  # without overlap each window's first token goes unscored, as in the recipe
    if stride < max_length:
        assert n == len(ids) - 1
    assert math.exp(nll / n) == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-3)


def test_perplexity_fields_and_bits_per_byte(tiny_pair):
    ours, tok, _, _ = tiny_pair
    r = perplexity(ours, tok, ["hello world. " * 20, "the quick brown fox"], max_length=32, stride=16)
    assert r["bytes"] == len(("hello world. " * 20 + "\n\n" + "the quick brown fox").encode())
    assert r["bits_per_byte"] == pytest.approx(r["nll_per_token"] * r["tokens"] / math.log(2) / r["bytes"])
    assert r["perplexity"] == pytest.approx(math.exp(r["nll_per_token"]))


def test_bad_stride_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="stride"):
        window_nlls(tiny_pair[0], [1, 2, 3], max_length=8, stride=9)
