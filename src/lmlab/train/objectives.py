"""What the model learns from a batch: next-token prediction (decoders) or masked tokens (encoders)."""

from __future__ import annotations

import torch

from lmlab.model.transformer import Transformer


def causal_lm_loss(
    model: Transformer, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, **kwargs
) -> torch.Tensor:
    """Mean cross-entropy of predicting y[t] from x[..t]; y == -100 is ignored."""
    return model(x, targets=y, label_smoothing=label_smoothing, **kwargs)


def mask_tokens(
    ids: torch.Tensor,
    vocab_size: int,
    mask_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick `probability` of tokens; of those 80% -> [MASK], 10% -> random, 10% unchanged.

    Returns (inputs, labels) with labels -100 where nothing is predicted.
    """
    picked = torch.rand(ids.shape, generator=generator) < probability
    labels = ids.masked_fill(~picked, -100)
    r = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[picked & (r < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator)
    swap = picked & (r >= 0.8) & (r < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels


def masked_lm_loss(
    model: Transformer, x: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, **kwargs
) -> torch.Tensor:
    """Cross-entropy on the masked positions only."""
    return causal_lm_loss(model, x, labels, label_smoothing, **kwargs)
