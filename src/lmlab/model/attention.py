"""Multi-head self-attention with grouped KV heads (MHA, GQA, MQA), on PyTorch's fused SDPA kernel
(or, training on the CPU, lmlab's: kernels/attention.py)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.kernels import attention as cpu_attention
from lmlab.model.config import ModelConfig
from lmlab.model.rope import apply_rope


class KVCache(Protocol):
    """What the model needs of a KV cache: how many tokens it holds, and appending a step's keys/values.

    `length` counts the tokens cached before the current forward call; `update` stores this call's
    keys/values for one layer and returns all of them (B, H_kv, length + T, hd). The cache advances
    `length` itself once the last layer has been updated.
    """

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    """Self-attention; n_kv_head < n_head shares each key/value head among a group of query heads."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        n_head, n_kv_head = cfg.heads(layer)  # per layer once structured pruning removed some
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, n_head, n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(n_head * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.dropout = cfg.attn_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        q_scale: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `mask` is boolean or an additive float bias (ALiBi)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if (
            kv_cache is None
            and q_scale is None
            and cpu_attention.applies(q, k, v, rope=rope, causal=is_causal, masked=mask is not None, dropout=dropout)
        ):
            # training on the CPU: RoPE and attention in one kernel, faster than ATen's flash attention
            y = cpu_attention.attention(q, k, v, is_causal, rope)
            return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if q_scale is not None:
            q = q * q_scale
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H_kv, S, hd)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
