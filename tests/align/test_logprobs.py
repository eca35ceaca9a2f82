"""The one completion log-prob function against transformers' per-token log-probs on padded batches."""

from __future__ import annotations

import pytest
import torch

from lmlab.align.logprobs import completion_logprobs, sequence_logprobs
from lmlab.model.checkpoint import load_pretrained
from tests.conftest import hf_tiny


def _batch(side: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    lengths = [12, 9, 6]
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, n:] = 0
            comp[i, n - 4 : n] = 1  # the last 4 real tokens are the completion
        else:
            mask[i, : 12 - n] = 0
            comp[i, -4:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, comp


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_logprobs_equal_transformers(side, tmp_path):
    hf = hf_tiny("llama")
    hf.save_pretrained(tmp_path)
    ours, _ = load_pretrained(tmp_path)
    ids, mask, comp = _batch(side)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        want = torch.zeros(ids.shape)
        want[:, 1:] = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        want = want * comp
        got, ent = completion_logprobs(ours, ids, mask, comp, entropy=True)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got != 0, comp.bool())
    p = logits[:, :-1].softmax(-1)
    want_ent = torch.zeros(ids.shape)
    want_ent[:, 1:] = -(p * p.clamp(min=1e-30).log()).sum(-1)
    assert (ent - want_ent * comp).abs().max().item() <= 1e-4
    assert torch.allclose(sequence_logprobs(ours, ids, mask, comp), want.sum(-1), atol=1e-4)


def test_temperature_divides_the_logits(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path)
    ours, _ = load_pretrained(tmp_path)
    ids, mask, comp = _batch("right")
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).float() / 0.7
        want = torch.zeros(ids.shape)
        want[:, 1:] = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        got, _ = completion_logprobs(ours, ids, mask, comp, temperature=0.7)
    assert (got - want * comp).abs().max().item() <= 1e-5
