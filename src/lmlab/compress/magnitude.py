"""Magnitude pruning: drop the weights with the smallest |w|, per layer or over the whole model."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.compress.sparsity import Masks, masks_from_scores, prunable


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """|W| of every prunable weight: the oldest importance score (Han et al. 2015)."""
    return {name: m.weight.detach().abs() for name, m in prunable(model).items()}


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer", pattern: str | None = None) -> Masks:
    """Masks removing the smallest-magnitude `sparsity` of weights in each layer (scope "layer"), each
    row ("row"), or all layers pooled ("global": layers with small weights lose more); or N:M."""
    return masks_from_scores(magnitude_scores(model), sparsity, scope, pattern)
