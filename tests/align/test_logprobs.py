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


def _pairs(prompt_lengths, reply_lengths, T=18, seed=0):
    """(B, 2, T) right-padded pairs: the same prompt in both rows, then each row's reply and one more real token
    that is not scored (as the chat template's newline after <|im_end|>)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    ids = torch.zeros((B, 2, T), dtype=torch.long)
    mask, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, p in enumerate(prompt_lengths):
        prompt = torch.randint(3, 128, (p,), generator=g)
        for j in range(2):
            n = reply_lengths[b][j]
            ids[b, j, :p] = prompt
            ids[b, j, p : p + n + 1] = torch.randint(3, 128, (n + 1,), generator=g)
            mask[b, j, : p + n + 1] = 1
            comp[b, j, p : p + n] = 1
    return ids, mask, comp


def test_pair_logprobs_run_the_prompt_once_and_equal_whole_rows(tmp_path):
    """Sharing each pair's prompt (one forward, its keys/values reused by both replies) gives the log-probs and
    the gradients of scoring the two rows whole."""
    from lmlab.align.logprobs import pair_logprobs

    hf_tiny("llama").save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path)
    ids, mask, comp = _pairs([5, 9, 3], [(4, 1), (2, 6), (7, 3)])
    full = completion_logprobs(model, ids.flatten(0, 1), mask.flatten(0, 1), comp.flatten(0, 1))[0].sum(-1).view(3, 2)
    (full * torch.tensor([1.0, -0.5])).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls, inner = [], model.hidden_states
    model.hidden_states = lambda ids, **kw: calls.append(tuple(ids.shape)) or inner(ids, **kw)
    shared = pair_logprobs(model, ids, mask, comp)
    del model.hidden_states
    (shared * torch.tensor([1.0, -0.5])).sum().backward()
    assert torch.allclose(shared, full, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-5, rtol=1e-4), n
    assert calls == [(3, 17)]  # one forward, a pair per row: [prompt][chosen][rejected], the longest 9 + 2 + 6
    assert 6 * int(mask.sum(-1).max()) > 3 * 17  # fewer slots than the 6 rows of up to 15 tokens


def test_pair_logprobs_fall_back_when_prompts_differ(tmp_path):
    from lmlab.align.logprobs import pair_logprobs

    hf_tiny("llama").save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path)
    ids, mask, comp = _pairs([5, 4], [(3, 2), (2, 2)])
    ids[1, 1, 0] = 7 if ids[1, 1, 0] != 7 else 8  # a pair truncated differently: the prompts differ
    with torch.no_grad():
        full = completion_logprobs(model, ids.flatten(0, 1), mask.flatten(0, 1), comp.flatten(0, 1))[0]
        assert torch.allclose(pair_logprobs(model, ids, mask, comp), full.sum(-1).view(2, 2), atol=1e-6)
