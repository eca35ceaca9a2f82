"""Vocabulary extension (how Chinese-LLaMA and others teach a model a new script): characters the
tokenizer can only map to [UNK] become new tokens, with new embedding rows that fine-tuning learns.

English-only WordPiece vocabularies (all-MiniLM-L6-v2's, bert-base-uncased's) lack most Chinese
characters: 63% of the tokens of the fetched Chinese reviews are [UNK], so the model cannot tell
the texts apart. New rows start at the mean of the existing embeddings (plus small noise), the
usual choice that keeps the first forward passes in distribution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import AddedToken
from torch import nn

from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer


def unknown_characters(tokenizer: Tokenizer, texts: Iterable[str], min_count: int = 2) -> list[str]:
    """Characters of `texts` that the tokenizer encodes as its unknown token, seen at least min_count times."""
    unk = tokenizer.token_id(tokenizer.special.get("unk_token"))
    if unk is None:
        return []  # byte-level tokenizers have no unknown token: every character is already covered
    counts = Counter(c for t in texts for c in t if not c.isspace())
    out = []
    for char, n in counts.most_common():
        if n < min_count:
            break
        if tokenizer.encode(char, add_special_tokens=False) == [unk]:
            out.append(char)
    return out


@torch.no_grad()
def extend_vocabulary(model: Transformer, tokenizer: Tokenizer, new_tokens: list[str], seed: int = 0) -> int:
    """Add tokens to the tokenizer and rows to the model's embedding (and untied LM head); returns how many."""
    if not new_tokens:
        return 0
    old = tokenizer.vocab_size
    tokenizer.backend.add_tokens([AddedToken(t, single_word=False, normalized=True) for t in new_tokens])
    n = tokenizer.vocab_size - old
    if n == 0:
        return 0
    g = torch.Generator().manual_seed(seed)

    def grow(weight: torch.Tensor) -> nn.Parameter:
        mean, std = weight.mean(0, keepdim=True), weight.std(0, keepdim=True)
        rows = mean + 0.1 * std * torch.randn(n, weight.shape[1], generator=g).to(weight.dtype)
        return nn.Parameter(torch.cat([weight, rows.to(weight.device)]), requires_grad=weight.requires_grad)

    model.embed.weight = grow(model.embed.weight)
    model.embed.num_embeddings = model.embed.weight.shape[0]
    for head in (model.lm_head, getattr(model.mlm_head, "decoder", None)):
        if head is not None and not model.cfg.tie_embeddings:
            head.weight = grow(head.weight)
            if head.bias is not None:
                head.bias = nn.Parameter(torch.cat([head.bias, head.bias.new_zeros(n)]))
            head.out_features = head.weight.shape[0]
    model.cfg.vocab_size = model.embed.weight.shape[0]
    model.tie_weights()
    return n
