"""Adversarial training on embeddings (the seed's remedy for fragile models): FGM and PGD.

Both perturb the embedded input in the direction that raises the loss most, and train on the clean
and the perturbed loss together. The perturbation is added to the embedding layer's output, so each
token occurrence gets its own (the embedding table itself is never edited in place, which keeps tied
heads and autograd safe).
  FGM (Miyato et al. 2017): one step, r = epsilon * g / ||g||.
  PGD (Madry et al. 2018): `steps` steps of size alpha, each projected back into the epsilon ball.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _embedding(model: nn.Module) -> nn.Module:
    raw = getattr(model, "module", model)  # DDP wraps the model
    raw = getattr(raw, "_orig_mod", raw)  # torch.compile too
    return raw.embed


def _normalized(g: torch.Tensor) -> torch.Tensor:
    # one norm per example over all its tokens and dimensions
    norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def _loss_with(loss_fn: LossFn, model: nn.Module, batch: Any, delta: torch.Tensor | None):
    """The loss with `delta` added to the embeddings, and the embedded input (for its gradient)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if delta is not None:
            output = output + delta
        seen["emb"] = output
        return output

    handle = _embedding(model).register_forward_hook(hook)
    try:
        loss = loss_fn(model, batch)
    finally:
        handle.remove()
    return loss, seen["emb"]


def adversarial_loss(
    loss_fn: LossFn, method: str = "fgm", epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3
) -> LossFn:
    """Wrap a loss function: returns clean loss + adversarial loss (their gradients add, as in FGM/PGD)."""
    if method not in ("fgm", "pgd"):
        raise LmlabError(f"{method!r} is not fgm or pgd", field="finetune.adversarial.method")
    if epsilon <= 0:
        raise LmlabError(f"epsilon must be > 0, got {epsilon}", field="finetune.adversarial.epsilon")

    def wrapped(model: nn.Module, batch: Any) -> torch.Tensor:
        clean, emb = _loss_with(loss_fn, model, batch, None)
        if not torch.is_grad_enabled():  # evaluation: the plain loss
            return clean
        (g,) = torch.autograd.grad(clean, emb, retain_graph=True)
        if method == "fgm":
            delta = epsilon * _normalized(g)
        else:
            delta = torch.zeros_like(g)
            for i in range(steps):
                delta = delta + alpha * _normalized(g)
                # project back into the epsilon ball around the clean embedding
                norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
                delta = delta * (epsilon / norm).clamp(max=1.0)
                if i < steps - 1:
                    probe = delta.detach().requires_grad_(True)
                    loss_k, _ = _loss_with(loss_fn, model, batch, probe)
                    (g,) = torch.autograd.grad(loss_k, probe)
        adv, _ = _loss_with(loss_fn, model, batch, delta.detach())
        return clean + adv

    return wrapped
