"""Perplexity and bits per byte with a sliding window: windows of max_length tokens, scoring only the new ones."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.utils.progress import progress_bar


@torch.no_grad()
def window_nlls(
    model: torch.nn.Module, ids: list[int], max_length: int, stride: int, progress: bool = False
) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens scored) per window, the Hugging Face recipe: each window scores its new tokens."""
    if stride < 1 or max_length < 2 or stride > max_length:
        raise ValueError(f"need 1 <= stride <= max_length and max_length >= 2, got {stride=} {max_length=}")
    device = next(model.parameters()).device
    seq = torch.tensor(ids, dtype=torch.long, device=device)
    out: list[tuple[float, int]] = []
    prev_end = 0
    starts = range(0, len(ids), stride)
    for begin in progress_bar(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end  # tokens this window scores: those after the previous window's end
        window = seq[begin:end][None]  # (1, W)
        targets = window[0, 1:]
        n = min(trg_len, targets.numel())  # the first window cannot score its first token
        if n > 0:
            # logits only at the n positions that predict scored tokens (position t predicts token t + 1)
            scored = torch.zeros_like(window, dtype=torch.bool)
            scored[0, -1 - n : -1] = True
            logits = model(window, logits_mask=scored).float()  # (n, V)
            nll = F.cross_entropy(logits, targets[-n:], reduction="sum")
            out.append((float(nll), n))
        prev_end = end
        if end == len(ids):
            break
    return out


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int = 1024,
    stride: int = 512,
    separator: str = "\n\n",
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity, bits per byte and per-window records of texts joined by `separator` (as in the HF recipe)."""
    text = separator.join(texts)
    ids = tokenizer.encode(text, add_special_tokens=True)
    windows = window_nlls(model, ids, max_length, stride, progress)
    nll = sum(w[0] for w in windows)
    n = sum(w[1] for w in windows)
    n_bytes = len(text.encode("utf-8"))
    return {
        "perplexity": math.exp(nll / n),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "nll_per_token": nll / n,
        "tokens": n,
        "bytes": n_bytes,
        "max_length": max_length,
        "stride": stride,
        "windows": [{"nll": a, "tokens": b} for a, b in windows],
    }
