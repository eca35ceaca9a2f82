"""The logit lens (nostalgebraist, 2020): read every layer's residual stream through the final norm and
the LM head, to see at which depth the model's eventual prediction appears.

Row 0 is the embeddings, row i the residual stream after block i; the last row is the model's own logits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer
from lmlab.utils.atomic import write_json
from lmlab.viz import style


@torch.no_grad()
def residual_stream(model: Transformer, input_ids: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
    """n_layer + 1 tensors (B, T, d): the input of the first block, then each block's output."""
    stream: list[torch.Tensor] = []
    first = model.layers[0].register_forward_pre_hook(lambda m, args, kw: stream.append(args[0]), with_kwargs=True)
    after = [block.register_forward_hook(lambda m, a, out: stream.append(out)) for block in model.layers]
    was_training = model.training
    model.eval()
    try:
        model.hidden_states(input_ids, **kwargs)
    finally:
        for h in (first, *after):
            h.remove()
        model.train(was_training)
    return stream


def lm_head(model: Transformer) -> torch.nn.Module:
    """The model's LM or MLM head; a model without one (classifier, bare trunk) is a one-line error."""
    head = model.lm_head if model.lm_head is not None else model.mlm_head
    if head is None:
        raise LmlabError(
            f"the logit lens needs a model with an LM head; this one has head {model.cfg.head!r}",
            hint="use a causal LM or a masked-LM checkpoint",
        )
    return head


def read_out(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) of hidden states h (..., d) through the final norm (if any) and the LM/MLM head."""
    return model.full_vocab(lm_head(model)(model.norm(h) if model.norm is not None else h))


@torch.no_grad()
def logit_lens(
    model: Transformer, input_ids: torch.Tensor, rows: Sequence[int] | None = None, **kwargs: Any
) -> torch.Tensor:
    """Logits (n_layer + 1, B, T, vocab) float32 of every layer's residual stream; the last row equals the
    model's logits. rows picks some of the n_layer + 1 (each costs a full vocabulary projection)."""
    lm_head(model)  # fail before the forward pass
    stream = residual_stream(model, input_ids, **kwargs)
    rows = range(len(stream)) if rows is None else rows
    return torch.stack([read_out(model, stream[i]).float() for i in rows])


def targets(input_ids: torch.Tensor, causal: bool) -> tuple[torch.Tensor, int]:
    """The correct token at each position (T',) and how many positions have one: the next token for a
    decoder (the last position has none), the token itself for a masked-LM encoder."""
    ids = input_ids.reshape(-1)
    return (ids[1:], len(ids) - 1) if causal else (ids, len(ids))


def lens_tables(logits: torch.Tensor, input_ids: torch.Tensor, causal: bool, k: int = 5) -> dict[str, torch.Tensor]:
    """For one sequence's lens logits (L + 1, T, V): top-k probabilities and ids per layer and position,
    and the probability of the correct token (L + 1, T')."""
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (L + 1, T, k)
    want, n = targets(input_ids, causal)
    correct = probs[:, :n].gather(-1, want[None, :, None].expand(probs.shape[0], n, 1)).squeeze(-1)
    return {"top_p": top_p, "top_i": top_i, "correct": correct}


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_lens(
    tables: dict[str, torch.Tensor], tokens: list[str], top_labels: list[list[str]], width: int = 10
) -> str:
    """Top-1 token and its probability per layer (rows) and position (columns), the final layer last."""
    L1, T = tables["top_p"].shape[:2]
    head = "layer".ljust(7) + "".join(_cell(f"{t}", width).ljust(width + 7) for t in tokens)
    lines = [head, "-" * len(head)]
    for layer in range(L1):
        name = "emb" if layer == 0 else str(layer)
        cells = [
            f"{_cell(top_labels[layer][t], width).ljust(width)} {float(tables['top_p'][layer, t, 0]):.2f}"
            for t in range(T)
        ]
        lines.append(name.ljust(7) + "".join(c.ljust(width + 7) for c in cells))
    return "\n".join(lines) + "\n"


def plot_lens(correct: torch.Tensor, top1: list[list[str]], xlabels: list[str], path: str | os.PathLike,
              title: str) -> Path:  # fmt: skip
    """Heatmap of the correct token's probability by layer (rows, embeddings at the bottom) and position,
    each cell annotated with the layer's top-1 token when they fit."""
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    style.check_glyphs(*xlabels, *(t for row in top1 for t in row))
    L1, n = correct.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.75 * n, 24), min(1.5 + 0.3 * L1, 16)))
    im = ax.imshow(correct.numpy(), cmap=style.SEQUENTIAL, vmin=0, vmax=1, aspect="auto", origin="lower",
                   interpolation="nearest")  # fmt: skip
    ax.grid(False)
    if n <= 40:
        ax.set_xticks(range(n), xlabels, rotation=90)
    ax.set_yticks(range(L1), ["emb"] + [str(i) for i in range(1, L1)], fontsize=7)
    if n <= 24 and L1 <= 40:
        for layer in range(L1):
            for t in range(n):
                v = float(correct[layer, t])
                ax.text(t, layer, _cell(top1[layer][t], 7), ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 else "white")  # fmt: skip
    ax.set_xlabel("correct token at each position (cells: the layer's top-1 guess)")
    ax.set_ylabel("layer (emb = embeddings)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="probability of the correct token")
    fig.tight_layout()
    return save_png(fig, path)


def inspect_lens(
    model: Transformer,
    tokenizer: Any,
    input_ids: torch.Tensor,
    tokens: list[str],
    out: str | os.PathLike,
    data: str = "",
    k: int = 5,
) -> dict[str, Any]:
    """The lens of one sequence (1, T): out/lens.json (top-k per layer and position, the correct token's
    probability) and out/lens.png; returns them with the printable table under "table"."""
    from lmlab.viz.tokens import token_text

    logits = logit_lens(model, input_ids)[:, 0]  # (L + 1, T, V)
    causal = model.cfg.causal
    tables = lens_tables(logits, input_ids[0], causal, k)
    decode = lambda i: token_text(tokenizer, i)
    top_i = tables["top_i"]
    top1 = [[decode(top_i[layer, t, 0]) for t in range(top_i.shape[1])] for layer in range(top_i.shape[0])]
    n = tables["correct"].shape[1]
    xlabels = tokens[1:] if causal else tokens
    out = Path(out)
    what = "Logit lens: probability of the " + ("next token" if causal else "token") + " by layer"
    image = plot_lens(tables["correct"], [row[:n] for row in top1], xlabels[:n], out / "lens.png",
                      style.title(what, data))  # fmt: skip
    result = {
        "tokens": tokens,
        "causal": causal,
        "layers": ["embeddings"] + [f"layer {i}" for i in range(1, top_i.shape[0])],
        "correct_prob": tables["correct"].tolist(),
        "top": [
            [
                [
                    {"token": decode(i), "id": int(i), "p": float(p)}
                    for i, p in zip(top_i[layer, t], tables["top_p"][layer, t])
                ]
                for t in range(top_i.shape[1])
            ]
            for layer in range(top_i.shape[0])
        ],
        "image": str(image),
    }
    write_json(out / "lens.json", result)
    return {**result, "table": format_lens(tables, tokens, top1)}
