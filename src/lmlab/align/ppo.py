"""PPO with a KL penalty: InstructGPT's third stage (Ouyang et al. 2022, after Ziegler et al. 2019).

A rollout samples completions from the policy; the reward of a completion is the reward model's score at
its last token minus, at every token, kl_coef times an estimate of KL(policy || reference) (k1: log-ratio,
or k3). A value model (initialised from the reward model, as InstructGPT does) estimates returns;
GAE(gamma, lambda) turns rewards and values into advantages, whitened over the rollout. Each rollout is
used for several epochs of minibatch updates of the clipped policy loss and the clipped value loss.
kl_coef is fixed or follows the adaptive controller of Ziegler et al. toward a target KL.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.align.logprobs import completion_logprobs
from lmlab.align.metrics import AlignLoss
from lmlab.align.reference import OnlineReference
from lmlab.align.reward_model import RewardScorer
from lmlab.align.rollout import Rollouts
from lmlab.model.transformer import Transformer


# -- the pieces, each checked against its formula in tests/align/test_ppo.py ---------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) on tokens sampled from the policy: k1 = logp - ref (unbiased,
    can be negative), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r} (k1 or k3)")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) (B, T) by generalized advantage estimation over each row's masked tokens
    (contiguous, as a completion is): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
    with V and A zero past the last token; returns = A + V."""
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x normalised to unit variance (unbiased) over the masked entries, and zero mean unless shift_mean=False."""
    m = mask.bool()
    mean, var = x[m].mean(), x[m].var()
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): the masked mean of max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip))."""
    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    m = mask.bool()
    return losses[m].mean(), ((ratio - 1).abs() > clip)[m].float().mean()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): the masked mean of 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old +
    clip(V - V_old, -clip, clip)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    m = mask.bool()
    return 0.5 * torch.max(a, b)[m].mean(), (b > a)[m].float().mean()


class KLController:
    """kl_coef: fixed, or Ziegler et al.'s adaptive rule toward `target` per rollout:
    coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon (n: completions in the rollout)."""

    def __init__(self, coef: float = 0.05, target: float | None = None, horizon: int = 10000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        """Adapt after a rollout whose mean KL (summed over a completion's tokens) was `kl`."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n / self.horizon


# -- the trained module: policy and value model side by side --------------------------------------
class ActorCritic(nn.Module):
    """The policy (an LM) and the value model (one score per token), one module for the Trainer."""

    def __init__(self, policy: Transformer, value: Transformer) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.cfg = policy.cfg  # what checkpoints describe
        self.adapter = _ActorCriticCheckpoint(self)  # the Trainer writes and reads checkpoints through it

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(logp, entropy, values) (B, T); values[:, t] is V of the state before token t (the value model's
        output at t - 1), aligned with logp[:, t]."""
        logp, ent = completion_logprobs(self.policy, input_ids, attention_mask, completion_mask,
                                        temperature=temperature, entropy=True)  # fmt: skip
        v = self.value(input_ids, attention_mask=attention_mask).float().squeeze(-1)  # (B, T)
        return logp, ent, F.pad(v[:, :-1], (1, 0))


class _ActorCriticCheckpoint:
    """Checkpoints of an ActorCritic: the policy where load_pretrained (or peft, for LoRA) reads it, the value
    model in value/."""

    def __init__(self, ac: ActorCritic) -> None:
        self.ac = ac

    def _policy_adapter(self):
        return getattr(self.ac.policy, "adapter", None)

    def owns(self, name: str) -> bool:
        if name.startswith("value."):
            return True
        inner = self._policy_adapter()
        return name.startswith("policy.") and (inner is None or inner.owns(name.removeprefix("policy.")))

    def write(self, model: ActorCritic, params: dict[str, torch.Tensor], directory: Path) -> None:
        from lmlab.model.checkpoint import save_state

        policy = {n.removeprefix("policy."): t for n, t in params.items() if n.startswith("policy.")}
        value = {n.removeprefix("value."): t for n, t in params.items() if n.startswith("value.")}
        inner = self._policy_adapter()
        if inner is not None:
            inner.write(model.policy, policy, directory)
        else:
            save_state(model.policy.cfg, policy, None, directory)
        save_state(model.value.cfg, value, None, directory / "value")

    def read(self, model: ActorCritic, directory: Path) -> dict[str, torch.Tensor]:
        from lmlab.model.checkpoint import load_pretrained

        inner = self._policy_adapter()
        if inner is not None:
            policy = inner.read(model.policy, directory)
        else:
            policy = dict(load_pretrained(directory)[0].state_dict())
        value = dict(load_pretrained(directory / "value")[0].state_dict())
        return {**{f"policy.{n}": t for n, t in policy.items()}, **{f"value.{n}": t for n, t in value.items()}}


# -- the loss and the rollouts ------------------------------------------------------------------
class PPOLoss(AlignLoss):
    """The Trainer's loss_fn for PPO: clipped policy loss + vf_coef x clipped value loss."""

    def __init__(self, clip: float = 0.2, clip_value: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.clip, self.clip_value, self.vf_coef, self.temperature = clip, clip_value, vf_coef, temperature

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["completion_mask"]
        logp, ent, values = model(batch["input_ids"], batch["attention_mask"], mask, self.temperature)
        pg, pg_clip = policy_loss(logp, batch["old_logps"], batch["advantages"], mask, self.clip)
        vf, vf_clip = value_loss(values, batch["old_values"], batch["returns"], mask, self.clip_value)
        m = mask.bool()
        approx_kl = 0.5 * ((logp.detach() - batch["old_logps"]) ** 2)[m]
        self.record(model, policy_loss=pg.detach(), value_loss=vf.detach(), clip_ratio=pg_clip,
                    value_clip_ratio=vf_clip, entropy=ent[m], approx_kl=approx_kl)  # fmt: skip
        return pg + self.vf_coef * vf


class PPORollouts(Rollouts):
    """Sampled completions scored by a reward model, with per-token KL penalties, values and GAE."""

    def __init__(self, *args, scorer: RewardScorer, kl: KLController, kl_estimator: str = "k1",
                 gamma: float = 1.0, lam: float = 0.95, temperature: float = 1.0, whiten_advantages: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.scorer, self.kl, self.kl_estimator = scorer, kl, kl_estimator
        self.gamma, self.lam, self.temperature, self.whiten = gamma, lam, temperature, whiten_advantages
        self.reference: OnlineReference | None = None

    def set_policy(self, model: nn.Module) -> None:
        """model: the ActorCritic; its policy generates, its base (or a frozen copy) is the reference."""
        super().set_policy(model)
        self.reference = OnlineReference(model.policy)

    @torch.no_grad()
    def collect(self, index: int) -> dict[str, torch.Tensor]:
        """Sample, score with the reward model, add the KL penalty, estimate values, GAE."""
        ac = self.policy
        batch = self.sample(ac.policy, index, self.prompt_indices(index))
        ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        was = ac.training
        ac.eval()
        logp, _, values = ac(ids, attn, comp, self.temperature)
        ac.train(was)
        ref = self.reference.logps(ids, attn, comp, self.temperature)
        m = comp.to(logp.dtype)
        kl = kl_estimate(logp, ref, self.kl_estimator) * m  # (R, T)
        score = self.scorer.score(ids, attn).to(logp.device)  # (R,)
        last = (comp * torch.arange(comp.shape[1], device=comp.device)).argmax(1)  # each completion's last token
        rewards = -self.kl.coef * kl
        rewards[torch.arange(len(last)), last] += score
        values = values * m
        adv, returns = gae(rewards, values, comp, self.gamma, self.lam)
        if self.whiten:
            adv = whiten(adv, comp)
        seq_kl = kl.sum(1).mean()
        self.metrics.add(score=score.mean(), kl=seq_kl, kl_coef=self.kl.coef, non_score_reward=-self.kl.coef * seq_kl,
                         completion_length=comp.sum(1).float().mean(),
                         truncated=(~batch["finished"]).float().mean())  # fmt: skip
        self.kl.update(float(seq_kl), len(ids))
        batch.update(old_logps=logp, old_values=values, advantages=adv, returns=returns)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The rollout in progress and the KL coefficient."""
        return {**super().state_dict(), "kl_coef": self.kl.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rollout in progress and the KL coefficient."""
        super().load_state_dict(state)
        if "kl_coef" in state and not math.isnan(state["kl_coef"]):
            self.kl.coef = float(state["kl_coef"])
