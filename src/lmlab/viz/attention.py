"""Attention maps: the exact attention weights of every layer and head, per-head summaries and heatmaps.

The forward pass runs attention in fused kernels (SDPA, lmlab's CPU kernel) that never materialize the
weights. So a hook takes each attention layer's own inputs (hidden states, RoPE angles, mask, log-n
scale) during a normal forward and recomputes softmax(q k^T / sqrt(d) + mask) with the layer's own
projections and the model's apply_rope: the same q and k the fast path used, written out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmlab.errors import LmlabError
from lmlab.model.attention import Attention
from lmlab.model.rope import apply_rope
from lmlab.model.transformer import Transformer
from lmlab.utils.atomic import atomic_path, write_json
from lmlab.viz import style


def attention_probs(
    attn: Attention,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    q_scale: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """Attention weights (B, n_head, T, T) float32 of one layer for its input x (B, T, C), as SDPA computes them."""
    B, T, _ = x.shape
    q = attn.q(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = attn.k(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if q_scale is not None:
        q = q * q_scale
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # GQA: KV head j serves query heads of group j
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    if mask is not None:
        # boolean: True where a query may look; float: an additive bias (ALiBi, with -inf where masked)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1)


@torch.no_grad()
def attention_weights(
    model: Transformer,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[int, torch.Tensor]:
    """{layer: weights (B, n_head, T, T)} for one forward pass over input_ids (B, T).

    kwargs go to the model's forward (attention_mask, position_ids, prefix_len, ...), so the weights
    respect the same causal, padding, window and prefix masks. Rows of padding queries are what the
    model computes for them (they see every key); they carry no meaning.
    """
    layers = range(model.cfg.n_layer) if layers is None else layers
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        attn = model.layers[i].attn

        def hook(module: Attention, args: tuple, kw: dict, i: int = i) -> None:
            x = args[0] if args else kw["x"]
            out[i] = attention_probs(module, x, **kw)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model.hidden_states(input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: out[i] for i in layers}


def parse_indices(spec: str | Sequence[int] | None, n: int, what: str) -> list[int]:
    """Indices from "0,2,5-7" (or a list); all n when None. Out of range: a one-line error naming it."""
    if spec is None or spec == "":
        return list(range(n))
    items: list[int] = []
    parts = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    for part in (p.strip() for p in parts):
        try:
            if "-" in part.lstrip("-"):
                lo, hi = part.split("-", 1)
                items += range(int(lo), int(hi) + 1)
            else:
                items.append(int(part))
        except ValueError:
            raise LmlabError(f"{part!r} is not an index or a range like 2-5", field=what) from None
    for i in items:
        if not 0 <= i < n:
            raise LmlabError(f"{what[:-1]} {i} is out of range: the model has {n} {what} (0-{n - 1})", field=what)
    return list(dict.fromkeys(items))


def head_summary(weights: torch.Tensor) -> list[dict[str, float]]:
    """Per head of one sequence's weights (H, T, T): mean entropy (nats), mean distance attended (tokens),
    and the share of attention the first token receives (an attention sink) from queries after it."""
    H, T, _ = weights.shape
    p = weights.double()
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1).mean(-1)  # (H,)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().double()  # (T, T)
    distance = (p * dist).sum(-1).mean(-1)
    sink = p[:, 1:, 0].mean(-1) if T > 1 else p[:, 0, 0]  # query 0 sees only itself in a decoder
    return [
        {"head": h, "entropy": float(entropy[h]), "distance": float(distance[h]), "first_token": float(sink[h])}
        for h in range(H)
    ]


def format_summary(summary: dict[int, list[dict[str, float]]]) -> str:
    """A table: one row per layer and head; heads putting over half their attention on token 0 are marked."""
    lines = ["layer  head  entropy (nats)  distance (tokens)  on first token", "-" * 64]
    for layer, heads in summary.items():
        for s in heads:
            sink = "  sink" if s["first_token"] > 0.5 else ""
            lines.append(
                f"{layer:>5}  {s['head']:>4}  {s['entropy']:>14.3f}  {s['distance']:>17.2f}  "
                f"{s['first_token']:>14.2f}{sink}"
            )
    return "\n".join(lines) + "\n"


def plot_layer(
    weights: torch.Tensor, tokens: list[str], heads: Sequence[int], path: str | os.PathLike, title: str
) -> Path:
    """One PNG of a layer: a heatmap per head (query rows, key columns), tokens on both axes."""
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    style.check_glyphs(*tokens)
    T = len(tokens)
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    side = min(max(2.6, 0.22 * T + 1.0), 9.0)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows + 0.6), squeeze=False, layout="constrained")
    show_ticks = T <= 64
    im = None
    for ax, h in zip(axes.flat, heads):
        im = ax.imshow(weights[h].numpy(), cmap=style.SEQUENTIAL, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.grid(False)
        ax.set_title(f"head {h}")
        if show_ticks:
            ax.set_xticks(range(T), tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(T), tokens, fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    return save_png(fig, path)


def inspect_attention(
    model: Transformer,
    input_ids: torch.Tensor,
    tokens: list[str],
    out: str | os.PathLike,
    layers: str | Sequence[int] | None = None,
    heads: str | Sequence[int] | None = None,
    data: str = "",
    plots: bool = True,
) -> dict[str, Any]:
    """Weights of one sequence (1, T) to out/attention.safetensors (`layer.N`: (n_head, T, T) float32),
    per-head summaries to out/attention.json and a heatmap PNG per layer; returns the summary."""
    cfg = model.cfg
    layer_idx = parse_indices(layers, cfg.n_layer, "layers")
    head_idx = parse_indices(heads, cfg.n_head, "heads")
    weights = {i: w[0].float().cpu().contiguous() for i, w in attention_weights(model, input_ids, layer_idx).items()}
    out = Path(out)
    meta = {"tokens": json.dumps(tokens, ensure_ascii=False), "format": "pt"}
    with atomic_path(out / "attention.safetensors") as tmp:
        save_file({f"layer.{i}": w for i, w in weights.items()}, str(tmp), metadata=meta)
    summary = {i: [s for s in head_summary(w) if s["head"] in head_idx] for i, w in weights.items()}
    images = []
    if plots:
        for i, w in weights.items():
            what = f"Attention weights, layer {i}"
            images.append(
                str(plot_layer(w, tokens, head_idx, out / f"attention-layer{i:02d}.png", style.title(what, data)))
            )
    result = {"tokens": tokens, "layers": layer_idx, "heads": head_idx, "summary": summary, "images": images}
    write_json(out / "attention.json", {**result, "summary": {str(k): v for k, v in summary.items()}})
    return result
