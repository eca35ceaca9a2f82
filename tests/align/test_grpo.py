"""GRPO's pieces: group advantages, k3, the clipped surrogate and its aggregations, against formulas and TRL."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmlab.align.grpo import GRPOLoss, aggregate, clipped_surrogate, group_advantages, k3
from lmlab.align.logprobs import completion_logprobs
from lmlab.model.checkpoint import load_pretrained


def test_advantages_sum_to_zero_per_group_and_equal_rewards_give_zero():
    r = torch.tensor([1.0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 3, -1, 2, 0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))
    g = r.view(3, 4)
    assert torch.allclose(adv.view(3, 4), (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4))
    assert torch.allclose(group_advantages(r, 4, scale=False).view(3, 4), g - g.mean(1, keepdim=True))


def test_k3_is_nonnegative_and_zero_at_the_reference():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(100, generator=g) * 5, -torch.rand(100, generator=g) * 5
    assert (k3(logp, ref) >= 0).all()
    assert torch.equal(k3(logp, logp), torch.zeros(100))


def _batch(tiny_chat_llama):
    model, _ = load_pretrained(tiny_chat_llama)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (4, 10), generator=g)
    comp = torch.zeros(4, 10, dtype=torch.long)
    comp[:, 6:] = 1
    comp[1, 8:] = 0  # a completion that stopped early (right padding after it)
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    return model.train(), {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_first_iteration_ratio_is_one_and_gradient_is_reinforce(tiny_chat_llama, loss_type):
    model, batch = _batch(tiny_chat_llama)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25, -0.75])
    loss = GRPOLoss(loss_type=loss_type, max_new_tokens=4)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss(model, batch), params)
    # REINFORCE: -A * log pi, aggregated the same way
    logp, _ = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    _, ratio = clipped_surrogate(logp, logp.detach(), batch["advantages"], 0.2, 0.2)
    assert torch.equal(ratio, torch.ones_like(ratio))
    reinforce = aggregate(-batch["advantages"][:, None] * logp, batch["completion_mask"], loss_type, 4)
    want = torch.autograd.grad(reinforce, params)
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, atol=1e-6)


def test_equal_rewards_give_zero_gradient(tiny_chat_llama):
    model, batch = _batch(tiny_chat_llama)
    batch["advantages"] = group_advantages(torch.full((4,), 0.7), 4)
    grads = torch.autograd.grad(GRPOLoss()(model, batch), list(model.parameters()))
    assert all(float(g.abs().max()) == 0 for g in grads)


def _trl_grpo_loss(loss_type, beta, logp, old, ref, adv, mask, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss on fixed per-token log-probs (completion columns only)."""
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    ident = lambda x, **kw: x
    t.accelerator = SimpleNamespace(gather=ident, reduce=ident, sync_gradients=True, num_processes=1)
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.__dict__.update(model=SimpleNamespace(training=True), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                      importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
                      epsilon_high=eps_high, use_vllm=False, current_gradient_accumulation_steps=1,
                      max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
                      _metrics=defaultdict(lambda: defaultdict(list)))  # fmt: skip
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    B, C = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}  # fmt: skip
    return float(t._compute_loss(None, inputs))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_trl_on_fixed_logprobs(loss_type, beta):
    g = torch.Generator().manual_seed(2)
    B, C = 6, 5
    logp = -torch.rand(B, C, generator=g) * 3
    old = logp + torch.randn(B, C, generator=g) * 0.3  # off-policy: some ratios are clipped
    ref = logp + torch.randn(B, C, generator=g) * 0.2
    mask = torch.ones(B, C)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    adv = group_advantages(torch.rand(B, generator=g), 3)
    want = _trl_grpo_loss(loss_type, beta, logp, old, ref, adv, mask, 0.2, 0.28, C)
    per_token, _ = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    if beta:
        per_token = per_token + beta * k3(logp, ref)
    ours = aggregate(per_token, mask, loss_type, C)
    assert abs(float(ours) - want) <= 1e-6
