"""Which keys each query may see: causal, padding, sliding window and prefix-LM, as one boolean mask."""

from __future__ import annotations

import torch

from lmlab.model.config import ModelConfig


def build_mask(
    cfg: ModelConfig,
    q_len: int,
    k_len: int,
    attention_mask: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    q_idx: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend; None means "no restriction".

    Indices are positions in the key sequence: the T queries are the last T of the S keys (a KV
    cache holds the first S - T). `attention_mask` (B, S) marks real tokens with 1, padding with 0.
    `document_ids` (B, S): packed sequences; a token sees only tokens of its own document.
    `q_idx` (T,): where the queries sit among the keys when not the last T (a static KV cache).
    `branch_ids` (B, S): a shared trunk (0) and branches after it (1, 2, ...) in one row, e.g. a prompt and two
    replies: a token sees the trunk and its own branch, never another branch.
    """
    sliced = q_idx is None
    if sliced:
        q_idx = torch.arange(k_len - q_len, k_len, device=device)
    k_idx = torch.arange(k_len, device=device)
    mask = None
    if cfg.causal:
        mask = k_idx[None, :] <= q_idx[:, None]  # (T, S)
        if cfg.sliding_window is not None:
            mask = mask & (q_idx[:, None] - k_idx[None, :] < cfg.sliding_window)
        mask = mask[None, None]  # (1, 1, T, S)
        if prefix_len is not None:
            # ChatGLM's prefix LM: the prompt sees itself both ways; what follows stays causal
            in_prefix = k_idx[None, :] < prefix_len.to(device)[:, None]  # (B, S)
            mask = mask | in_prefix[:, None, None, :]
    if document_ids is not None:
        docs = document_ids.to(device)
        q_docs = docs[:, k_len - q_len :] if sliced else docs.index_select(1, q_idx)
        same = q_docs[:, None, :, None] == docs[:, None, None, :]  # (B, 1, T, S)
        mask = same if mask is None else mask & same
    if branch_ids is not None:
        br = branch_ids.to(device)
        q_br = br[:, k_len - q_len :] if sliced else br.index_select(1, q_idx)
        seen = (br[:, None, None, :] == 0) | (q_br[:, None, :, None] == br[:, None, None, :])  # (B, 1, T, S)
        mask = seen if mask is None else mask & seen
    if attention_mask is not None:
        keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
        # a query that sees nothing (a padding position) would give NaN; let it see everything
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask
