"""Fine-tuning losses: sequence and token classification, with the seed's remedies for skewed labels
(class weights) and over-confidence (label smoothing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "document_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs a batch holds for the model (everything but ids and labels)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def classification_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of a sequence (B, L) or token (B, T, L) classifier; labels -100 are ignored.

    class_weights (L,) scale each class's examples (a weighted mean, as torch and scikit-learn define it).
    """
    logits = model(batch["input_ids"], **model_inputs(batch))
    weight = class_weights.to(logits.device) if class_weights is not None else None
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        batch["labels"].reshape(-1),
        weight=weight,
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
