"""Sparsity masks: which weights are pruned, N:M patterns, per-layer reports, masks kept through training.

A mask is a 0/1 tensor shaped like a weight; pruning multiplies the weight by it. Unstructured
methods (magnitude, Wanda) differ only in the score that decides which weights go: this file turns
scores into masks (lowest fraction per row, per layer or over the whole model, or N of every M).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.train.trainer import Callback, Trainer

Masks = dict[str, torch.Tensor]  # parameter name ("layers.0.attn.q.weight") -> 0/1 mask of its shape
SCOPES = ("row", "layer", "global")


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the Transformer blocks, by weight name. Embeddings and the LM head stay
    dense (as in Wanda and SparseGPT): they are lookups or shared with the embedding."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            out[f"{name}.weight"] = m
    return out


def check_sparsity(sparsity: float, field: str = "sparsity") -> float:
    """A valid target sparsity: a fraction in [0, 1) (1 would remove everything)."""
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LmlabError(f"sparsity {sparsity!r} is outside [0, 1)", field=field, hint="e.g. 0.5 for half the weights")
    return float(sparsity)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N weights of every M consecutive ones along the input dimension."""
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise LmlabError(f"pattern {pattern!r} is not N:M", field="pattern", hint="e.g. 2:4") from None
    if not 0 < n < m:
        raise LmlabError(f"pattern {pattern!r} needs 0 < N < M", field="pattern")
    return n, m


def check_pattern(widths: dict[str, int], nm: tuple[int, int]) -> None:
    """Every layer's input width must split into groups of M."""
    m = nm[1]
    for name, width in widths.items():
        if width % m:
            raise LmlabError(f"the N:M pattern {nm[0]}:{m} does not divide {name}'s input width {width}",
                             field="pattern", hint=f"use an M that divides {width}")  # fmt: skip


def lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A mask that zeroes exactly round(sparsity * numel) lowest scores of a tensor (ties broken by index)."""
    k = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten().float(), k, largest=False).indices] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest `sparsity` of each output row (Wanda compares weights within a row)."""
    k = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores.float(), k, dim=1, largest=False).indices, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row (2:4 sparsity)."""
    rows, cols = scores.shape
    groups = scores.float().reshape(rows, cols // m, m)  # (out, in/m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def masks_from_scores(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer", pattern: str | None = None
) -> Masks:
    """Masks from per-weight scores (higher = keep): N:M if a pattern is given, else the lowest `sparsity`
    per row, per layer, or over all layers together (global)."""
    nm = parse_pattern(pattern)
    if nm is not None:
        check_pattern({n: s.shape[1] for n, s in scores.items()}, nm)
        return {name: nm_mask(s, *nm) for name, s in scores.items()}
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise LmlabError(f"scope {scope!r} is not one of {', '.join(SCOPES)}", field="scope")
    if scope == "row":
        return {name: row_mask(s, sparsity) for name, s in scores.items()}
    if scope == "layer":
        return {name: lowest_mask(s, sparsity) for name, s in scores.items()}
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    mask = lowest_mask(flat, sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name]))  # the weight's dtype and device


def weight_masks(model: nn.Module, masks: Masks) -> Masks:
    """`masks` in their weights' dtype and device, all-ones masks dropped: converted once, so re-applying
    them after every optimizer step allocates nothing and touches only weights that are pruned."""
    params = dict(model.named_parameters())
    return {name: m.to(params[name]) for name, m in masks.items() if not bool(m.all())}


def masks_from_zeros(model: nn.Module) -> Masks:
    """The masks a pruned checkpoint implies: its zero weights stay zero (fine-tuning a pruned model)."""
    return {name: m.weight.detach() != 0 for name, m in prunable(model).items()}


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Per-layer and overall fraction of zero weights among the prunable linears, and of all parameters."""
    layers, zeros, total = [], 0, 0
    for name, m in prunable(model).items():
        z, n = int((m.weight == 0).sum()), m.weight.numel()
        layers.append({"name": name, "shape": list(m.weight.shape), "sparsity": z / n})
        zeros, total = zeros + z, total + n
    params = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "sparsity": zeros / max(total, 1), "prunable": total, "zeros": zeros,
            "parameters": params, "nonzero_parameters": params - zeros}  # fmt: skip


def format_report(report: dict[str, Any], every: int = 1) -> str:
    """The report as a short table (every n-th layer, then the total)."""
    lines = [f"{'weight':<32} {'shape':>14} {'sparsity':>9}"]
    for row in report["layers"][::every]:
        lines.append(f"{row['name']:<32} {'x'.join(map(str, row['shape'])):>14} {row['sparsity']:>8.1%}")
    lines.append(f"{'all prunable':<32} {report['prunable']:>14,} {report['sparsity']:>8.1%}")
    return "\n".join(lines)


class KeepMasks(Callback):
    """Re-apply masks after every optimizer step, so pruned weights stay zero while the rest trains
    (AdamW's momentum and weight decay would otherwise move them off zero)."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks
        self._weights: Masks | None = None  # the masks as weights, made at the first step

    def on_step_end(self, trainer: Trainer) -> None:
        if self._weights is None:
            self._weights = weight_masks(trainer.raw, self.masks)
        apply_masks(trainer.raw, self._weights)
