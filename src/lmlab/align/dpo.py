"""Direct Preference Optimization (Rafailov et al. 2023) and its variants, as a Trainer loss.

DPO's implicit reward of a reply is r = beta * (log pi(y|x) - log pi_ref(y|x)); with
delta = (log-ratio of the chosen reply) - (log-ratio of the rejected one) the losses are

  sigmoid   -log sigmoid(beta delta)                      (with label_smoothing e: conservative DPO,
                                                           -(1-e) log sigmoid(beta delta) - e log sigmoid(-beta delta))
  robust    ((1-e)(-log sigmoid(beta delta)) - e(-log sigmoid(-beta delta))) / (1 - 2e)   (Chowdhury et al. 2024)
  hinge     max(0, 1 - beta delta)                        (SLiC)
  ipo       (delta_per_token - 1 / (2 beta))^2            (Azar et al. 2023; log-ratios divided by the reply's
                                                           token count, as TRL does)

Reference log-probs come with the batch (cached once, see reference.py), so no reference model runs here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.align.data import PairDataset
from lmlab.align.logprobs import pair_logprobs
from lmlab.align.metrics import AlignLoss
from lmlab.errors import LmlabError

LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss (B,) from log pi - log pi_ref of the chosen and rejected replies (B,) each.

    IPO needs the replies' token counts (B,) to normalise the log-ratios by length.
    """
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        e = label_smoothing
        return -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        e = label_smoothing
        return (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO normalises by length: pass chosen_tokens and rejected_tokens")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise LmlabError(f"unknown DPO loss {loss_type!r}; one of {', '.join(LOSS_TYPES)}", field="align.loss_type")


class DPOLoss(AlignLoss):
    """The Trainer's loss_fn for DPO: batch (B, 2, T) pairs with cached ref_logps (B, 2)."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise LmlabError(f"{loss_type!r} must be one of {', '.join(LOSS_TYPES)}", field="align.loss_type")
        if beta <= 0:
            raise LmlabError(f"{beta!r} must be > 0", field="align.beta")
        if not 0 <= label_smoothing < 0.5:
            raise LmlabError(f"{label_smoothing!r} must be in [0, 0.5)", field="align.label_smoothing")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def pair_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(loss per pair, chosen log-ratio, rejected log-ratio) of a batch."""
        if "ref_logps" not in batch:
            raise LmlabError("DPO batches need cached reference log-probs", hint="call reference.pair_reference")
        ids, attn, comp = (batch[k] for k in ("input_ids", "attention_mask", "completion_mask"))
        logps = pair_logprobs(model, ids, attn, comp)  # (B, 2): chosen, rejected; each prompt run once
        ratios = logps - batch["ref_logps"].to(logps.dtype)
        tokens = comp.sum(-1).to(logps.dtype)
        loss = dpo_loss(ratios[:, 0], ratios[:, 1], self.beta, self.loss_type, self.label_smoothing,
                        tokens[:, 0], tokens[:, 1])  # fmt: skip
        return loss, ratios[:, 0], ratios[:, 1]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, chosen, rejected = self.pair_terms(model, batch)
        rc, rr = self.beta * chosen.detach(), self.beta * rejected.detach()
        self.record(model, reward_chosen=rc, reward_rejected=rr, reward_margin=rc - rr,
                    reward_accuracy=(rc > rr).float())  # fmt: skip
        return loss.mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: PairDataset, batch_size: int = 8, prefix: str = "val_") -> dict:
        """Loss, reward accuracy and margin over every pair of a held-out set (each once)."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        losses, margins = [], []
        for _, batch in data.batches(batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, chosen, rejected = self.pair_terms(model, batch)
            losses.append(loss.float().cpu())
            margins.append((self.beta * (chosen - rejected)).float().cpu())
        model.train(was)
        m = torch.cat(margins)
        return {f"{prefix}dpo_loss": float(torch.cat(losses).mean()), f"{prefix}reward_margin": float(m.mean()),
                f"{prefix}reward_accuracy": float((m > 0).float().mean())}  # fmt: skip
