"""ALiBi (Press et al.; BLOOM, Baichuan-13B): no position embeddings, a per-head linear distance penalty."""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; for non-powers of two, interleave the next power's."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < n_head:
        extra_base = 2.0 ** (-4.0 / closest)  # the slopes of 2 * closest heads, odd ones
        slopes += [extra_base ** (2 * i + 1) for i in range(n_head - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Additive bias (1, H, T, S) = -slope * |q - k|: farther keys get less attention."""
    dist = (q_idx[:, None] - k_idx[None, :]).abs().float()  # (T, S)
    return -slopes.to(dist.device)[None, :, None, None] * dist
