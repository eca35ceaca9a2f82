"""Sentence embeddings from a model's final hidden states: mean, first-token (CLS) or last-token pooling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.finetune.task_data import encode_truncated, iter_jsonl, pad_id
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.atomic import atomic_path

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, d) from hidden states (B, T, d) of right-padded rows: masked mean, first token or last real token."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.long().sum(-1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise LmlabError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}", field="pooling")


@torch.no_grad()
def embed(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_len: int = 512,
) -> np.ndarray:
    """Embeddings (N, d) float32 of `texts`, in input order; each text gets special tokens and is cut to max_len.

    pooling: "mean" (attention-mask weighted, sentence-transformers' default), "cls" (first token, for BERT-style
    encoders) or "last" (last real token, for decoders). normalize=True scales rows to unit L2 norm.
    """
    if pooling not in POOLINGS:
        raise LmlabError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}", field="pooling")
    if batch_size < 1:
        raise LmlabError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        max_len = min(max_len, cfg.max_seq_len)  # learned position tables end there
    param = next(model.parameters())
    encodings, _ = encode_truncated(tokenizer, list(texts), max_len)
    rows = [e.ids for e in encodings]
    empty = next((i for i, r in enumerate(rows) if not r), None)
    if empty is not None:
        raise LmlabError(f"text {empty} has no tokens", hint="drop empty texts")
    # longest first: rows of similar length share a batch, so little padding is computed
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = np.zeros((len(rows), cfg.d_model if cfg is not None else 0), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        pad = pad_id(tokenizer)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(rows[idx[0]])
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            ids, mask = ids.to(param.device), mask.to(param.device)
            hidden = model.hidden_states(ids, attention_mask=mask)  # (B, T, d)
            vec = pool(hidden.float(), mask, pooling)
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            if out.shape[1] != vec.shape[-1]:
                out = np.zeros((len(rows), vec.shape[-1]), dtype=np.float32)
            out[idx] = vec.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts to embed: .txt gives one per non-blank line; .jsonl gives each line's `field`."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, obj in iter_jsonl(path):
            if field not in obj:
                raise LmlabError("missing field", file=str(path), line=n, field=field)
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise LmlabError(f"expected a non-empty string, got {obj[field]!r:.40}", file=str(path), line=n,
                                 field=field)  # fmt: skip
            texts.append(obj[field])
    elif path.suffix == ".txt":
        if not path.is_file():
            raise LmlabError("no such file", file=str(path))
        texts = []
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise LmlabError(f"not UTF-8 ({e.reason} at byte {e.start})", file=str(path), line=n) from None
                if line.strip():
                    texts.append(line)
    else:
        raise LmlabError("expected a .txt file (one text per line) or a .jsonl file", file=str(path))
    if not texts:
        raise LmlabError("no texts in this file", file=str(path))
    return texts


def write_embeddings(array: np.ndarray, out_path: str | os.PathLike) -> None:
    """Save an (N, d) array as .npy atomically: the file appears complete or not at all."""
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise LmlabError("embeddings are written as .npy", file=str(out_path), hint="name the output *.npy")
    with atomic_path(out_path) as tmp, tmp.open("wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, np.asarray(array))
