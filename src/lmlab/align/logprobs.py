"""Log-probabilities of completion tokens: the one function every aligner (DPO, PPO, GRPO) scores text with.

A batch holds whole sequences (prompt + completion, padded left or right) and a completion mask. Token t
is predicted by the logits at t - 1, so the vocabulary projection runs only at positions whose next token
belongs to the completion (`logits_mask`): a prompt of 200 tokens and a reply of 20 cost 20 rows of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy): logp[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) where completion_mask[b, t],
    0 elsewhere (B, T); entropy (B, T) of the distribution token t was drawn from (None unless asked).

    Sum logp over t for a sequence's log-probability. `temperature` divides the logits, as sampling did.
    """
    predict = completion_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    if attention_mask is not None:
        predict = predict & attention_mask[:, 1:].bool()
    logits_mask = F.pad(predict, (0, 1), value=False)  # (B, T)
    logits = model(input_ids, attention_mask=attention_mask, logits_mask=logits_mask).float()  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:][predict]  # (N,) in the same row-major order as the logits
    lse = logits.logsumexp(-1)  # (N,)
    token_logp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # (N,)
    shifted = F.pad(predict, (1, 0), value=False)  # (B, T): the positions of the predicted tokens
    logp = torch.zeros(input_ids.shape, dtype=token_logp.dtype, device=input_ids.device)
    logp = logp.masked_scatter(shifted, token_logp)
    ent = None
    if entropy:
        with torch.no_grad():  # logged, not trained on
            h = lse - (logits.softmax(-1) * logits).sum(-1)  # (N,)
            ent = torch.zeros_like(logp).masked_scatter(shifted, h)
    return logp, ent


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Each sequence's completion log-probability (B,): the sum of `completion_logprobs`."""
    return completion_logprobs(model, input_ids, attention_mask, completion_mask)[0].sum(-1)
