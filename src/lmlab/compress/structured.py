"""Structured pruning: remove whole attention heads (by KV group, for GQA) and MLP neurons.

Unstructured sparsity needs sparse kernels to run faster; removing heads and neurons makes every
matrix smaller, so a dense model gets faster as it is. The config then holds per-layer widths
(ModelConfig.layer_n_head / layer_n_kv_head / layer_d_ff) unless every layer lost the same amount.

Importance of a unit (a KV group with its query heads, or a neuron), over calibration batches:
- activation: the L2 norm of what the unit adds to the residual stream (its output through o or down);
- gradient: |dL/dg| for a gate g = 1 multiplying the unit's output (Michel et al. 2019), the
  first-order estimate of how much the loss changes when the unit is removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from lmlab.compress.sparsity import Masks, check_sparsity
from lmlab.errors import LmlabError
from lmlab.model.checkpoint import build_model
from lmlab.model.transformer import Transformer
from lmlab.utils.progress import progress_bar

IMPORTANCE = ("activation", "gradient")


def _group_rows(attn: nn.Module, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of q (query heads of the kept groups) and of k/v (the groups) in the weight matrices."""
    hd, per = attn.head_dim, attn.n_head // attn.n_kv_head  # query heads per KV group
    heads = (groups[:, None] * per + torch.arange(per)).flatten()  # query head h serves group h // per
    q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
    kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
    return q_rows, kv_rows


def _gate_hooks(model: Transformer, what: str) -> tuple[list[torch.Tensor], list]:
    """Forward pre-hooks that multiply each unit's output by a gate of ones (per query head on o's input,
    per neuron on down's input); the gates' gradients give the gradient importance."""
    gates, handles = [], []
    for block in model.layers:
        if what == "heads":
            attn = block.attn
            g = torch.ones(attn.n_head, requires_grad=True, device=attn.o.weight.device)

            def hook(m, args, g=g, hd=attn.head_dim):
                y = args[0]
                return (y.view(*y.shape[:-1], -1, hd) * g[:, None].to(y.dtype)).flatten(-2)

            handles.append(attn.o.register_forward_pre_hook(hook))
        else:
            g = torch.ones(block.mlp.down.in_features, requires_grad=True, device=block.mlp.down.weight.device)
            handles.append(block.mlp.down.register_forward_pre_hook(lambda m, args, g=g: args[0] * g.to(args[0].dtype)))
        gates.append(g)
    return gates, handles


def _head_norms(m: nn.Linear, args: tuple, s: torch.Tensor, n: int) -> None:
    """Add each head's squared contribution: its slice of o's input through its columns of o's weight."""
    y = args[0].detach().float().reshape(-1, m.in_features)  # (tokens, heads * head_dim)
    w = m.weight.detach().float()  # (d, heads * head_dim)
    width = m.in_features // n
    for u in range(n):
        part = y[:, u * width : (u + 1) * width] @ w[:, u * width : (u + 1) * width].T  # (tokens, d)
        s[u] += float(part.pow(2).sum())


def _neuron_norms(m: nn.Linear, args: tuple, s: torch.Tensor) -> None:
    """One column per neuron: its contribution's squared norm is ||h_j||^2 * ||W_down[:, j]||^2."""
    y = args[0].detach().float().reshape(-1, m.in_features)  # (tokens, d_ff)
    s += (y.pow(2).sum(0) * m.weight.detach().float().pow(2).sum(0)).double().cpu()


def _output_norm_hooks(model: Transformer, what: str) -> tuple[list[torch.Tensor], list]:
    """Forward pre-hooks adding up, per unit, the squared norm of its contribution to the residual stream."""
    sums, handles = [], []
    for block in model.layers:
        if what == "heads":
            s = torch.zeros(block.attn.n_head, dtype=torch.float64)
            hook = lambda m, args, s=s, n=block.attn.n_head: _head_norms(m, args, s, n)
            handles.append(block.attn.o.register_forward_pre_hook(hook))
        else:
            s = torch.zeros(block.mlp.down.in_features, dtype=torch.float64)
            handles.append(block.mlp.down.register_forward_pre_hook(lambda m, args, s=s: _neuron_norms(m, args, s)))
        sums.append(s)
    return sums, handles


def importance(
    model: Transformer, batches: Iterable[torch.Tensor], what: str, kind: str = "activation", progress: bool = False
) -> list[torch.Tensor]:
    """Per layer, one score per unit: per KV group (what="heads") or per MLP neuron (what="neurons")."""
    if kind not in IMPORTANCE:
        raise LmlabError(f"importance {kind!r} is not one of {', '.join(IMPORTANCE)}", field="importance")
    model.eval()
    device = next(model.parameters()).device
    hooks = _gate_hooks if kind == "gradient" else _output_norm_hooks
    acc, handles = hooks(model, what)
    totals = [torch.zeros(a.shape, dtype=torch.float64) for a in acc]
    try:
        for ids in progress_bar(list(batches), desc=f"{what} importance", disable=not progress, leave=False):
            ids = ids.to(device)
            if kind == "gradient":
                model.zero_grad(set_to_none=True)
                loss = model.loss(ids, ids)
                grads = torch.autograd.grad(loss, acc)
                for t, g in zip(totals, grads):
                    t += g.detach().abs().double().cpu()  # |dL/dg| per batch, summed (Michel et al.)
            else:
                with torch.no_grad():
                    model(ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    scores = totals if kind == "gradient" else [a.sqrt() for a in acc]
    if what == "heads":  # a KV group's score: the sum over the query heads that share it
        scores = [s.view(block.attn.n_kv_head, -1).sum(1) for s, block in zip(scores, model.layers)]
    return [s.float() for s in scores]


def select(scores: list[torch.Tensor], fraction: float, scope: str = "layer") -> list[torch.Tensor]:
    """The indices to keep per layer (sorted): drop the lowest `fraction` of units in each layer, or over
    all layers pooled (scope "global"); every layer keeps at least one unit."""
    check_sparsity(fraction, "sparsity")
    if scope == "layer":
        keep = []
        for s in scores:
            n_drop = min(round(fraction * len(s)), len(s) - 1)
            keep.append(torch.topk(s, len(s) - n_drop).indices.sort().values)
        return keep
    if scope != "global":
        raise LmlabError(f"scope {scope!r} is not layer or global", field="scope")
    flat = torch.cat(scores)
    n_drop = round(fraction * len(flat))
    dropped = torch.zeros(len(flat), dtype=torch.bool)
    if n_drop:
        dropped[torch.topk(flat, n_drop, largest=False).indices] = True
    keep, start = [], 0
    for s in scores:
        d = dropped[start : start + len(s)]
        if bool(d.all()):  # never empty a layer: keep its best unit
            d = d.clone()
            d[s.argmax()] = False
        keep.append(torch.nonzero(~d).flatten())
        start += len(s)
    return keep


def structured_masks(
    model: Transformer, keep_groups: list[torch.Tensor] | None, keep_neurons: list[torch.Tensor] | None
) -> Masks:
    """Masks (original shapes) that zero the removed heads' and neurons' weights: the masked model
    computes what the physically pruned one does."""
    masks: Masks = {}
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        if keep_groups is not None:
            attn = block.attn
            q_rows, kv_rows = _group_rows(attn, keep_groups[i])
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                w = getattr(attn, name).weight
                masks[f"{p}attn.{name}.weight"] = _rows_mask(w, rows)
            masks[f"{p}attn.o.weight"] = _rows_mask(attn.o.weight.T, q_rows).T
        if keep_neurons is not None:
            mlp = block.mlp
            for name in ("gate", "up"):
                if getattr(mlp, name) is not None:
                    masks[f"{p}mlp.{name}.weight"] = _rows_mask(getattr(mlp, name).weight, keep_neurons[i])
            masks[f"{p}mlp.down.weight"] = _rows_mask(mlp.down.weight.T, keep_neurons[i]).T
    return masks


def _rows_mask(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[rows] = True
    return mask


@torch.no_grad()
def remove_units(
    model: Transformer, keep_groups: list[torch.Tensor] | None, keep_neurons: list[torch.Tensor] | None
) -> Transformer:
    """A new, smaller model holding only the kept KV groups (with their query heads) and neurons."""
    cfg = model.cfg
    if keep_groups is not None and cfg.pos == "alibi":
        raise LmlabError("removing heads from an ALiBi model is not supported (its slopes are per head)",
                         field="method")  # fmt: skip
    sd = {n: p.detach() for n, p in model.named_parameters()}
    heads, kv_heads, widths = [], [], []
    for i, block in enumerate(model.layers):
        p, attn = f"layers.{i}.", block.attn
        if keep_groups is not None:
            q_rows, kv_rows = _group_rows(attn, keep_groups[i])
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                sd[f"{p}attn.{name}.weight"] = sd[f"{p}attn.{name}.weight"][rows]
                if f"{p}attn.{name}.bias" in sd:
                    sd[f"{p}attn.{name}.bias"] = sd[f"{p}attn.{name}.bias"][rows]
            sd[f"{p}attn.o.weight"] = sd[f"{p}attn.o.weight"][:, q_rows]
            kv_heads.append(len(keep_groups[i]))
            heads.append(len(keep_groups[i]) * (attn.n_head // attn.n_kv_head))
        else:
            heads.append(attn.n_head)
            kv_heads.append(attn.n_kv_head)
        if keep_neurons is not None:
            keep = keep_neurons[i]
            for name in ("gate", "up"):
                for kind in ("weight", "bias"):
                    if f"{p}mlp.{name}.{kind}" in sd:
                        sd[f"{p}mlp.{name}.{kind}"] = sd[f"{p}mlp.{name}.{kind}"][keep]
            sd[f"{p}mlp.down.weight"] = sd[f"{p}mlp.down.weight"][:, keep]
            widths.append(len(keep))
        else:
            widths.append(block.mlp.down.in_features)
    new_cfg = dataclasses.replace(cfg, **_widths(heads, kv_heads, widths))
    dtype = next(model.parameters()).dtype
    return build_model(new_cfg, {n: t.contiguous() for n, t in sd.items()}, dtype, None)


def _widths(heads: list[int], kv_heads: list[int], widths: list[int]) -> dict:
    """Config fields for these per-layer widths: plain numbers when all layers agree (so transformers can
    read the checkpoint), else the per-layer lists."""
    out = {}
    for uniform, per_layer, values in (("n_head", "layer_n_head", heads), ("n_kv_head", "layer_n_kv_head", kv_heads),
                                       ("d_ff", "layer_d_ff", widths)):  # fmt: skip
        if len(set(values)) == 1:
            out[uniform], out[per_layer] = values[0], None
        else:
            out[uniform], out[per_layer] = max(values), list(values)
    return out


def prune_structured(
    model: Transformer,
    batches: list[torch.Tensor],
    head_sparsity: float = 0.0,
    neuron_sparsity: float = 0.0,
    kind: str = "activation",
    scope: str = "layer",
    progress: bool = False,
) -> tuple[Transformer, dict]:
    """Score, select and remove KV groups and neurons; returns the smaller model and what was kept."""
    keep_groups = keep_neurons = None
    if head_sparsity > 0:
        keep_groups = select(importance(model, batches, "heads", kind, progress), head_sparsity, scope)
    if neuron_sparsity > 0:
        keep_neurons = select(importance(model, batches, "neurons", kind, progress), neuron_sparsity, scope)
    before = sum(p.numel() for p in model.parameters())
    small = remove_units(model, keep_groups, keep_neurons)
    after = sum(p.numel() for p in small.parameters())
    info = {"parameters_before": before, "parameters_after": after, "removed_fraction": 1 - after / before,
            "kv_heads": [small.cfg.heads(i)[1] for i in range(small.cfg.n_layer)],
            "d_ff": [small.cfg.ff(i) for i in range(small.cfg.n_layer)]}  # fmt: skip
    return small, info


def logits_match(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    """The largest absolute logit difference of two models on the same ids (a check after pruning)."""
    with torch.no_grad():
        return float((a(ids).float() - b(ids).float()).abs().max())
