"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with verifiable rewards.

For each prompt, G completions are sampled and scored; a completion's advantage is its reward relative
to its group's, A = (r - mean) / (std + eps) (or r - mean: Dr. GRPO's scale_rewards "none"), the same for
every token of it. The loss is PPO's clipped surrogate with an asymmetric clip (DAPO's epsilon low/high),
plus beta times the k3 estimate of KL(policy || reference), aggregated over tokens as

  grpo      mean over sequences of each sequence's token mean
  bnpo      mean over the micro-batch's tokens
  dr_grpo   sum over tokens / (sequences x max_new_tokens)
  dapo      sum over tokens / tokens of the whole global batch
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.align.logprobs import completion_logprobs
from lmlab.align.metrics import AlignLoss
from lmlab.align.reference import OnlineReference
from lmlab.align.rewards import RewardFn
from lmlab.align.rollout import Rollouts
from lmlab.errors import LmlabError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(R,) advantages of rewards (R,) laid out as consecutive groups of `group_size`: r - group mean,
    divided by the group's standard deviation (unbiased, as TRL) + eps when `scale`."""
    g = rewards.view(-1, group_size)  # (R / G, G)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(d) - d - 1 with d = ref - logp; >= 0,
    and 0 where they agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, ratio): -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A), ratio = pi / pi_old."""
    ratio = torch.exp(logp - old_logp)
    a = advantages if advantages.dim() == logp.dim() else advantages[:, None]
    loss = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    return loss, ratio


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_new_tokens: int = 1,
    token_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss of per-token losses (B, T) over mask (B, T) under a loss type (see the module doc)."""
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum()
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        if token_scale is None:
            return total / m.sum().clamp(min=1)
        # token_scale = global rows / global tokens: the Trainer's mean over micro-batches then gives
        # exactly the sum over all tokens of the global batch divided by their count
        return total * token_scale[0].to(total.dtype) / per_token.shape[0]
    raise LmlabError(f"{loss_type!r} must be one of {', '.join(LOSS_TYPES)}", field="align.loss_type")


class GRPOLoss(AlignLoss):
    """The Trainer's loss_fn for GRPO on rollout minibatches (see GRPORollouts)."""

    def __init__(self, beta: float = 0.0, loss_type: str = "dapo", epsilon_low: float = 0.2,
                 epsilon_high: float | None = None, max_new_tokens: int = 64, temperature: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise LmlabError(f"{loss_type!r} must be one of {', '.join(LOSS_TYPES)}", field="align.loss_type")
        self.beta, self.loss_type, self.max_new_tokens, self.temperature = beta, loss_type, max_new_tokens, temperature
        self.eps_low = epsilon_low
        self.eps_high = epsilon_low if epsilon_high is None else epsilon_high

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["completion_mask"]
        logp, ent = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                                        temperature=self.temperature, entropy=True)  # fmt: skip
        # one update per rollout: the sampling policy is this very model, so the ratio is exactly 1
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        per_token, ratio = clipped_surrogate(logp, old, batch["advantages"], self.eps_low, self.eps_high)
        m = mask.bool()
        stats: dict[str, Any] = {}
        if self.beta:
            kl = k3(logp, batch["ref_logps"])
            per_token = per_token + self.beta * kl
            stats["kl"] = kl.detach()[m]
        loss = aggregate(per_token, mask, self.loss_type, self.max_new_tokens, batch.get("token_scale"))
        clipped = ((ratio < 1 - self.eps_low) | (ratio > 1 + self.eps_high))[m].float()
        self.record(model, entropy=ent[m], clip_ratio=clipped, **stats)
        return loss


class GRPORollouts(Rollouts):
    """Groups of G sampled completions per prompt, scored by reward functions, with group advantages."""

    def __init__(self, *args, reward_funcs: dict[str, RewardFn], reward_weights: list[float] | None = None,
                 scale_rewards: bool = True, beta: float = 0.0, temperature: float = 1.0,
                 log_completions_every: int = 0, log_file: str | Path | None = None, main: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.G < 2:
            raise LmlabError(f"a group of {self.G} completion cannot be compared with itself",
                             field="align.num_generations", hint="use num_generations >= 2")  # fmt: skip
        self.reward_funcs = reward_funcs
        self.weights = reward_weights or [1.0] * len(reward_funcs)
        if len(self.weights) != len(reward_funcs):
            raise LmlabError(f"{len(self.weights)} weights for {len(reward_funcs)} reward functions",
                             field="align.reward_weights")  # fmt: skip
        self.scale, self.beta, self.temperature = scale_rewards, beta, temperature
        self.log_every, self.log_file, self.main = log_completions_every, log_file, main
        self.reference: OnlineReference | None = None

    def set_policy(self, model: nn.Module) -> None:
        """Also set up the reference (none at all when beta = 0)."""
        super().set_policy(model)
        if self.beta:
            self.reference = OnlineReference(model)

    def score(self, texts: list[str], prompt_idx: list[int]) -> torch.Tensor:
        """(R, n_funcs) rewards; a function's None counts as 0."""
        recs = [self.prompts[i] for i in prompt_idx for _ in range(self.G)]
        fields: dict[str, list] = {"prompts": [r.messages for r in recs], "answer": [r.answer for r in recs]}
        for key in {k for r in recs for k in r.extra}:
            fields[key] = [r.extra.get(key) for r in recs]
        cols = []
        for name, fn in self.reward_funcs.items():
            values = fn(texts, **fields)
            if len(values) != len(texts):
                raise LmlabError(f"reward {name!r} returned {len(values)} values for {len(texts)} completions",
                                 field="align.reward_funcs")  # fmt: skip
            cols.append([0.0 if v is None else float(v) for v in values])
        return torch.tensor(cols, dtype=torch.float32).T.reshape(len(texts), len(cols))

    @torch.no_grad()
    def collect(self, index: int) -> dict[str, torch.Tensor]:
        """Sample, score, compute advantages (and old / reference log-probs when needed)."""
        prompt_idx = self.prompt_indices(index)
        batch = self.sample(self.policy, index, prompt_idx)
        texts = self.texts(batch)
        per_func = self.score(texts, prompt_idx)  # (R, F)
        rewards = per_func @ torch.tensor(self.weights)  # (R,)
        device = batch["input_ids"].device
        batch["advantages"] = group_advantages(rewards, self.G, self.scale).to(device)
        batch["rewards"] = rewards.to(device)
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        if self.updates_per_rollout > 1:  # later minibatches are off-policy: keep the sampling policy's log-probs
            was = self.policy.training
            self.policy.eval()
            batch["old_logps"] = completion_logprobs(self.policy, *args, temperature=self.temperature)[0]
            self.policy.train(was)
        if self.reference is not None:
            batch["ref_logps"] = self.reference.logps(*args, self.temperature)
        groups = rewards.view(-1, self.G)
        lengths = batch["completion_mask"].sum(1).float()
        stats = {f"reward/{name}": per_func[:, j].mean() for j, name in enumerate(self.reward_funcs)}
        self.metrics.add(reward=rewards.mean(), reward_std=groups.std(1).mean(),
                         frac_zero_std=(groups.std(1) == 0).float().mean(), completion_length=lengths.mean(),
                         truncated=(~batch["finished"]).float().mean(), **stats)  # fmt: skip
        if "answer_correct" in self.reward_funcs:
            self.metrics.add(pass_rate=per_func[:, list(self.reward_funcs).index("answer_correct")].mean())
        self._log_samples(index, prompt_idx, texts, per_func)
        return batch

    def finish_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """DAPO's normaliser: global rows / completion tokens of this global batch, on every row."""
        rows = batch["completion_mask"].shape[0]
        scale = rows / batch["completion_mask"].sum().clamp(min=1)
        batch["token_scale"] = scale.float().expand(rows).clone()
        return batch

    def _log_samples(self, index: int, prompt_idx: list[int], texts: list[str], per_func: torch.Tensor) -> None:
        step = index * self.updates_per_rollout
        if not (self.main and self.log_file and self.log_every and step % self.log_every == 0):
            return
        Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as f:
            for j, text in enumerate(texts):
                rec = self.prompts[prompt_idx[j // self.G]]
                rewards = {name: float(per_func[j, i]) for i, name in enumerate(self.reward_funcs)}
                f.write(json.dumps({"step": step, "prompt": rec.messages[-1]["content"], "answer": rec.answer,
                                    "completion": text, "rewards": rewards}, ensure_ascii=False) + "\n")  # fmt: skip
