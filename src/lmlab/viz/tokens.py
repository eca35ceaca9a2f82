"""Text -> token ids and readable per-token labels for plot axes, checked against the model's context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.tokenizer.tokenizer import Tokenizer

MARKS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "\\r"}


def label(piece: str) -> str:
    """One token's text made visible on an axis and in a table: spaces, line breaks and other control
    characters become marks or escapes."""
    out = "".join(MARKS.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in piece)
    return out or "∅"


def token_text(tokenizer: Tokenizer, i: int) -> str:
    """A vocabulary entry as a label; a byte-level piece of a UTF-8 character shows its bytes (\\xe4\\xb8)."""
    return label(tokenizer.token_bytes(int(i)).decode("utf-8", errors="backslashreplace"))


def encode_text(
    tokenizer: Tokenizer, text: str, cfg: ModelConfig, add_special_tokens: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Token ids (1, T) of `text` and one label per token.

    Labels come from each token's character span in the text, so a byte-level token holding part of a
    CJK character shows that character, not a broken byte.
    """
    if not text:
        raise LmlabError("the text is empty", field="text")
    enc = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
    if not enc.ids:
        raise LmlabError("the text has no tokens", field="text")
    if len(enc.ids) > cfg.max_seq_len:
        raise LmlabError(
            f"the text is {len(enc.ids)} tokens, longer than the model's context of {cfg.max_seq_len} tokens",
            field="text",
            hint="shorten it",
        )
    labels = []
    for i, (start, end) in zip(enc.ids, enc.offsets):
        piece = text[start:end] if end > start else (tokenizer.id_to_token(i) or str(i))  # special tokens
        labels.append(label(piece))
    return torch.tensor([enc.ids]), labels


def load_with_text(model: str, text: str) -> tuple[Any, Tokenizer, torch.Tensor, list[str], str]:
    """(model, tokenizer, ids (1, T), token labels, a title fragment "MODEL on “text”") for `lmlab inspect`."""
    from lmlab.model.checkpoint import load_config, load_pretrained
    from lmlab.viz.style import quote

    cfg = load_config(model)  # a text too long for the context fails before the weights load
    net, tokenizer = load_pretrained(model)
    if tokenizer is None:
        raise LmlabError("this checkpoint has no tokenizer", file=str(model))
    ids, tokens = encode_text(tokenizer, text, cfg)
    return net, tokenizer, ids, tokens, f"{Path(str(model)).name} on {quote(text)}"
