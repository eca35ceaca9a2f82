"""What a configuration costs: parameters, FLOPs per token, KV-cache bytes per token."""

from __future__ import annotations

from typing import Any

import torch

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts (tied weights once): total, embeddings, and the rest."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in (model.embed, model.pos_embed, model.type_embed) if m is not None)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs for one token attending to `context` tokens (a multiply-add is 2 FLOPs).

    Weight matmuls cost 2 FLOPs per weight; attention scores and the weighted sum cost
    2 * 2 * context * head_dim per head. Training costs about 3x this (forward + backward).
    """
    d, hd = cfg.d_model, cfg.head_dim
    attn_proj = d * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    head = d * cfg.vocab_size if cfg.head in ("lm", "mlm") else 0
    if cfg.head == "token_cls":
        head = d * cfg.num_labels  # a sequence classifier runs once per sequence: negligible
    span = min(context, cfg.sliding_window or context)
    attn_scores = 2 * cfg.n_head * hd * span
    return 2 * (cfg.n_layer * (attn_proj + mlp + attn_scores) + head)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of keys and values cached per token across all layers."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def switches(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture switches, in words."""
    if cfg.n_kv_head == cfg.n_head:
        attn = "MHA"
    elif cfg.n_kv_head == 1:
        attn = "MQA"
    else:
        attn = f"GQA ({cfg.n_head // cfg.n_kv_head} query heads per KV head)"
    pos = cfg.pos
    if pos == "rope":
        pos = f"RoPE (theta {cfg.rope_theta:g}" + (f", {cfg.rope_scaling})" if cfg.rope_scaling else ")")
    return {
        "family": cfg.family or "lmlab",
        "kind": "encoder (bidirectional)" if cfg.is_encoder else "decoder (causal)",
        "positions": pos,
        "norm": f"{cfg.norm}, {cfg.norm_position}-norm, eps {cfg.norm_eps:g}",
        "mlp": f"{cfg.mlp} ({cfg.act}), d_ff {cfg.d_ff}",
        "attention": f"{attn}, {cfg.n_head} heads x {cfg.head_dim}",
        "qkv_bias": cfg.qkv_bias,
        "attn_out_bias": cfg.attn_out_bias,
        "sliding_window": cfg.sliding_window,
        "logn_attn": cfg.logn_attn,
        "prefix_lm": cfg.prefix_lm,
        "tie_embeddings": cfg.tie_embeddings,
        "head": cfg.head + (" + pooler" if cfg.pooler else ""),
    }


def model_info(cfg: ModelConfig, context: int | None = None) -> dict[str, Any]:
    """Everything `lmlab model info` prints, as a dict."""
    context = context or cfg.max_seq_len
    return {
        "layers": cfg.n_layer,
        "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "params": count_params(cfg),
        "context": context,
        "flops_per_token": flops_per_token(cfg, context),
        "kv_cache_bytes_per_token": {
            "fp16/bf16": kv_cache_bytes_per_token(cfg, torch.float16),
            "fp32": kv_cache_bytes_per_token(cfg, torch.float32),
        },
        "switches": switches(cfg),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


def format_info(name: str, info: dict[str, Any]) -> str:
    """A readable block of text for the terminal."""
    p = info["params"]
    kv = info["kv_cache_bytes_per_token"]
    lines = [
        f"{name}",
        f"  parameters        {_human(p['total'])} ({p['total']:,}; embeddings {_human(p['embedding'])}, "
        f"rest {_human(p['non_embedding'])})",
        f"  shape             {info['layers']} layers, d_model {info['d_model']}, vocab {info['vocab_size']:,}, "
        f"context {info['max_seq_len']:,}",
        f"  FLOPs/token       {_human(info['flops_per_token'])} forward at context {info['context']:,} "
        f"(~3x for training)",
        f"  KV cache/token    {kv['fp16/bf16']:,} B in fp16/bf16, {kv['fp32']:,} B in fp32 "
        f"({_human(kv['fp16/bf16'] * info['max_seq_len'], 'B')} for a full fp16 context)",
        "  switches",
    ]
    lines += [f"    {k:<16}{v}" for k, v in info["switches"].items()]
    return "\n".join(lines)
