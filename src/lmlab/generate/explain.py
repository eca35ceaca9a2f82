"""Look inside one decoding step: the model's most likely next tokens and their probabilities."""

from __future__ import annotations

import torch

from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer


@torch.inference_mode()
def top_next_tokens(model: Transformer, tokenizer: Tokenizer, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text` (already templated), as (shown text, probability).

    A token that is only part of a UTF-8 character (common for Chinese in byte-level BPE) is shown
    as its bytes, e.g. <e4 b8>, instead of a replacement character.
    """
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=next(model.parameters()).device)
    probs = model(ids)[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(show_token(tokenizer, j), float(q)) for q, j in zip(p.tolist(), i.tolist())]


def show_token(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as readable text: its string in quotes, or its bytes when it is not whole UTF-8."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in raw) + ">"
