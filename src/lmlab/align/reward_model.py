"""The reward model of InstructGPT's second stage: a decoder with a one-label sequence-classification head
(the score of the last real token), trained on preference pairs with the Bradley-Terry loss

  -log sigmoid(r_chosen - r_rejected - margin)  [+ c * mean((r_chosen + r_rejected)^2), reward centering]

It is saved as transformers' *ForSequenceClassification with num_labels=1, which PPO loads to score rollouts.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.align.data import PairDataset
from lmlab.align.metrics import AlignLoss
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0, center: float = 0.0
) -> torch.Tensor:
    """Mean Bradley-Terry loss of scalar rewards (B,), with an optional margin and reward centering."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2) rewards of a pair batch: the model's one-label score of the chosen and the rejected sequence."""
    B = batch["input_ids"].shape[0]
    ids, attn = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)
    return model(ids, attention_mask=attn).float().view(B, 2)


class RewardLoss(AlignLoss):
    """The Trainer's loss_fn for a reward model on (B, 2, T) pair batches."""

    def __init__(self, center: float = 0.0, use_margin: bool = True) -> None:
        super().__init__()
        self.center, self.use_margin = center, use_margin

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        r = pair_rewards(model, batch)
        margin = batch["margin"].to(r.dtype) if self.use_margin and "margin" in batch else 0.0
        loss = bradley_terry_loss(r[:, 0], r[:, 1], margin, self.center)
        d = (r[:, 0] - r[:, 1]).detach()
        self.record(model, accuracy=(d > 0).float(), margin=d, reward_chosen=r[:, 0], reward_rejected=r[:, 1])
        return loss


@torch.no_grad()
def pair_scores(model: nn.Module, data: PairDataset, batch_size: int = 16) -> np.ndarray:
    """(N, 2) rewards of every pair of a set, in order."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [pair_rewards(model, {k: v.to(device) for k, v in b.items()}).cpu() for _, b in data.batches(batch_size)]
    model.train(was)
    return torch.cat(out).numpy()


def pair_accuracy(model: nn.Module, data: PairDataset, prefix: str = "val_") -> dict[str, float]:
    """Held-out pair accuracy (chosen scored above rejected; ties count half) and mean margin, with
    bootstrap standard errors; chance is 0.5."""
    from lmlab.eval.bootstrap import bootstrap_se

    s = pair_scores(model, data)
    d = s[:, 0] - s[:, 1]
    hits = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
    return {f"{prefix}accuracy": float(hits.mean()), f"{prefix}accuracy_se": bootstrap_se(hits.tolist()),
            f"{prefix}margin": float(d.mean()), f"{prefix}pairs": float(len(d))}  # fmt: skip


class RewardScorer:
    """A frozen reward model that scores token sequences (PPO's reward, or a before/after evaluation)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> RewardScorer:
        """A saved reward model (lmlab or transformers *ForSequenceClassification, one label)."""
        from lmlab.errors import LmlabError
        from lmlab.model.checkpoint import load_pretrained

        model, tokenizer = load_pretrained(path, device=device)
        if model.cfg.head != "seq_cls" or model.cfg.num_labels != 1:
            raise LmlabError("not a reward model (a sequence classifier with one label)", file=str(path),
                             field="align.reward_model")  # fmt: skip
        return cls(model, tokenizer)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of sequences (any padding: the head reads the last real token)."""
        device = next(self.model.parameters()).device
        return self.model(input_ids.to(device), attention_mask=attention_mask.to(device)).float().squeeze(-1)

    def score_texts(
        self, messages: list[list[dict[str, str]]], replies: list[str], batch_size: int = 16
    ) -> list[float]:
        """Rewards of replies to prompts (rendered with the reward model's chat template)."""
        from lmlab.align.data import pad_rows, render_completion

        out: list[float] = []
        for i in range(0, len(replies), batch_size):
            rows = [render_completion(self.tokenizer, m, r)[0] for m, r in
                    zip(messages[i : i + batch_size], replies[i : i + batch_size])]  # fmt: skip
            ids = pad_rows(rows, 0)
            mask = pad_rows([[1] * len(r) for r in rows], 0)
            out += self.score(ids, mask).tolist()
        return out
