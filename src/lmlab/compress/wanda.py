"""Wanda (Sun et al. 2023): prune by |W_ij| x ||X_j||_2, the weight times the L2 norm of its input
feature over a calibration set, comparing weights within each output row. No retraining, no
weight update: one forward pass over a few hundred calibration rows decides.

Weights that meet large activations matter more than their magnitude alone says; LLMs have a few
input features with huge activations (outliers), which magnitude pruning would cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from lmlab.compress.sparsity import Masks, apply_masks, masks_from_scores, prunable
from lmlab.utils.progress import progress_bar


class InputNorms:
    """Forward hooks that add up the squared inputs of linear layers, per input feature."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.sq = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
        self.tokens = 0
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            self.sq[name] += (x * x).sum(0).cpu()

        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """||X_j||_2 over every token seen, per layer (in_features,)."""
        return {name: s.sqrt().float() for name, s in self.sq.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2 for a weight (out, in) and its input feature norms (in,)."""
    return weight.detach().abs().float() * input_norm[None, :].to(weight.device)


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = False) -> dict[str, torch.Tensor]:
    """Input feature norms of every prunable linear over calibration batches of token ids (B, T)."""
    model.eval()
    hooks = InputNorms(prunable(model))
    try:
        for ids in progress_bar(list(batches), desc="calibration", disable=not progress, leave=False):
            model(ids.to(next(model.parameters()).device), logits_to_keep=1)  # the head is not needed
    finally:
        hooks.remove()
    return hooks.norms()


@torch.no_grad()
def wanda_masks(
    model: nn.Module,
    batches: list[torch.Tensor],
    sparsity: float,
    pattern: str | None = None,
    sequential: bool = True,
    progress: bool = False,
) -> Masks:
    """Wanda masks: the lowest `sparsity` of |W| x ||X|| in each output row, or N of every M.

    sequential: as the paper's code does, block i is calibrated on the outputs of blocks 0..i-1
    already pruned, so each block sees the inputs it will get. The model is pruned in place on the way
    (the masks are returned too); with sequential=False one dense pass scores every layer.
    """
    scope = "row"
    if not sequential:
        norms = input_norms(model, batches, progress)
        layers = prunable(model)
        masks = masks_from_scores({n: wanda_scores(layers[n].weight, v) for n, v in norms.items()},
                                  sparsity, scope, pattern)  # fmt: skip
        apply_masks(model, masks)
        return masks
    model.eval()
    device = next(model.parameters()).device
    # capture what the first block receives (hidden states and its attention arguments) for each batch
    inputs: list[tuple[torch.Tensor, dict]] = []

    class _Stop(Exception):
        pass

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args[0], kwargs))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(ids.to(device), logits_to_keep=1)
    finally:
        handle.remove()
    masks: Masks = {}
    for i, block in enumerate(progress_bar(model.layers, desc="wanda", disable=not progress, leave=False)):
        layers = {n: m for n, m in prunable(model).items() if n.startswith(f"layers.{i}.")}
        hooks = InputNorms(layers)
        try:
            for x, kw in inputs:
                block(x, **kw)
        finally:
            hooks.remove()
        scores = {n: wanda_scores(layers[n].weight, v) for n, v in hooks.norms().items()}
        block_masks = masks_from_scores(scores, sparsity, scope, pattern)
        apply_masks(model, block_masks)
        masks.update(block_masks)
        inputs = [(block(x, **kw), kw) for x, kw in inputs]  # the next block sees this pruned one's output
    return masks
