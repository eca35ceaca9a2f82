"""The FLOPs a training step really does, for MFU (model FLOPs utilization).

The usual rule, 6 x parameters x tokens, assumes every weight trains and every position is projected
to the vocabulary. Fine-tuning breaks both: LoRA and frozen layers compute no weight gradients (and a
frozen bottom of the network needs no input gradients either), and SFT projects to the vocabulary only
at the answer tokens. Counted here, one matmul at a time (a multiply-add is 2 FLOPs):

- forward: every weight matmul on every real token; attention scores and the weighted sum on every
  (query, key) pair the masks allow; the head only on the rows whose logits are computed;
- backward, input gradients: the same matmuls again wherever a trainable parameter lies below them
  (attention's backward is twice its forward: dQ, dK from the scores, dP, dV from the sum);
- backward, weight gradients: the matmul once more, for trainable weights only.

Padding, elementwise work (norms, activations, softmax) and embedding lookups are not counted: MFU
measures useful work, so it stays under 100% when the count and the peak are right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class StepCounts:
    """What one step's batch asks of the model."""

    tokens: int  # real (unpadded) tokens
    pairs: int  # (query, key) pairs that attention scores
    rows: int  # positions projected by the head (LM: those with a target)


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _linear(m: nn.Linear, upstream: bool) -> tuple[int, int, bool]:
    """(forward, backward) FLOPs per row of a linear layer, and whether it trains. Its input gradient is
    computed when `upstream` (something below it trains); a LoRA branch (lora_A, lora_B) counts too."""
    fwd = 2 * m.in_features * m.out_features
    trains = m.weight.requires_grad
    bwd = fwd * trains + fwd * upstream  # weight gradient; input gradient
    a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and not getattr(m, "merged", False):
        fa, fb = 2 * a.in_features * a.out_features, 2 * b.in_features * b.out_features
        a_trains, b_trains = a.weight.requires_grad, b.weight.requires_grad
        fwd += fa + fb
        bwd += fa * a_trains + fb * b_trains  # weight gradients
        bwd += fb * (a_trains or upstream) + fa * upstream  # input gradients
        trains = trains or a_trains or b_trains
    return fwd, bwd, trains


def _group(linears: list[nn.Linear | None], upstream: bool) -> tuple[int, int, bool]:
    """Linear layers that read the same input (q, k, v; gate, up)."""
    fwd = bwd = 0
    trains = False
    for m in linears:
        if m is not None:
            f, b, t = _linear(m, upstream)
            fwd, bwd, trains = fwd + f, bwd + b, trains or t
    return fwd, bwd, trains


def step_flops(model: nn.Module, counts: StepCounts, backward: bool = True) -> int:
    """FLOPs of one forward (and backward) pass of an lmlab Transformer over a batch with these counts."""
    cfg = model.cfg
    per_token = per_pair = per_row = 0
    # anything trainable below a matmul makes its input gradient necessary
    upstream = any(_trains(m) for m in (model.embed, model.pos_embed, model.type_embed, model.embed_norm))
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        upstream = upstream or _trains(block.norm1)
        f, b, t = _group([attn.q, attn.k, attn.v], upstream)
        per_token, upstream = per_token + f + b * backward, upstream or t
        # scores q.k and the weighted sum of values: 2 FLOPs x head_dim each, per head and pair
        f = 2 * 2 * attn.n_head * cfg.head_dim  # per layer: structured pruning may remove heads
        per_pair += f + 2 * f * (backward and upstream)
        f, b, t = _linear(attn.o, upstream)
        per_token, upstream = per_token + f + b * backward, upstream or t
        upstream = upstream or _trains(block.norm2)
        f, b, t = _group([mlp.gate, mlp.up], upstream)
        per_token, upstream = per_token + f + b * backward, upstream or t
        f, b, t = _linear(mlp.down, upstream)
        per_token, upstream = per_token + f + b * backward, upstream or t
    upstream = upstream or _trains(model.norm)
    heads: list[nn.Linear] = []
    if model.mlm_head is not None:
        upstream = upstream or _trains(model.mlm_head.norm)
        heads = [model.mlm_head.dense, model.mlm_head.decoder]
    elif model.lm_head is not None:
        heads = [model.lm_head]
    elif model.classifier is not None:
        heads = [m for m in (model.pooler, model.classifier) if m is not None]
    for m in heads:
        f, b, t = _linear(m, upstream)
        per_row, upstream = per_row + f + b * backward, upstream or t
    return per_token * counts.tokens + per_pair * counts.pairs + per_row * counts.rows


def _pairs(n: int, causal: bool, window: int | None) -> int:
    """Attention pairs in one sequence of n tokens."""
    if not causal:
        return n * n
    w = min(window or n, n)
    return w * (w + 1) // 2 + (n - w) * w  # query i sees min(i + 1, w) keys


def batch_counts(model: nn.Module, batch: Any) -> StepCounts:
    """Real tokens, attention pairs and head rows of a batch: a tensor of ids, an (ids, targets) pair, or a
    fine-tuning dict (input_ids, attention_mask, document_ids, labels)."""
    cfg = model.cfg
    if isinstance(batch, dict):
        ids, targets, labels = batch["input_ids"], None, batch.get("labels")
        mask, docs = batch.get("attention_mask"), batch.get("document_ids")
    else:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        labels = mask = docs = None
    ids = ids.reshape(-1, ids.shape[-1])  # preference pairs come as (B, 2, T): every sequence counts
    mask = mask.reshape(-1, mask.shape[-1]) if mask is not None else None
    B, T = ids.shape
    window = cfg.sliding_window
    if docs is not None:  # packed rows: each document attends within itself
        lengths: list[int] = []
        for row in docs.cpu():
            values, n = torch.unique_consecutive(row, return_counts=True)
            lengths += n[values >= 0].tolist()
    elif mask is not None:
        lengths = mask.sum(-1).tolist()
    else:
        lengths = [T] * B
    tokens = int(sum(lengths))
    pairs = sum(_pairs(int(n), cfg.causal, window) for n in lengths)
    if cfg.head in ("lm", "mlm"):
        if targets is not None:
            rows = int((targets != -100).sum())
        elif labels is not None:  # SFT labels are unshifted: position t predicts labels[t + 1]
            rows = int((labels[:, 1:] != -100).sum()) if cfg.causal else int((labels != -100).sum())
        else:
            rows = tokens
    elif cfg.head == "seq_cls":
        rows = B
    else:
        rows = tokens if cfg.head == "token_cls" else 0
    return StepCounts(tokens, pairs, rows)
