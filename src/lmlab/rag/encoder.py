"""The dense encoder of an index: sentence embeddings (mean pooled, unit length) from all-MiniLM-L6-v2 by default."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np

DEFAULT_ENCODER = "all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2: longer texts are cut there
PROBE = "lmlab index probe: which encoder wrote these vectors?"


class Encoder:
    """Texts -> float32 unit vectors (N, d), exactly as sentence-transformers computes them for MiniLM."""

    def __init__(self, name: str = DEFAULT_ENCODER, batch_size: int = 32, max_tokens: int = MAX_TOKENS) -> None:
        from lmlab.errors import LmlabError
        from lmlab.model.checkpoint import load_pretrained

        self.name, self.batch_size, self.max_tokens = str(name), batch_size, max_tokens
        self.model, tokenizer = load_pretrained(self.name)
        if tokenizer is None:
            raise LmlabError("this encoder has no tokenizer", file=self.name)
        self.tokenizer = tokenizer
        self.model.eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d) float32 unit vectors; an empty text gets the vector of a lone space (it still has special tokens)."""
        from lmlab.finetune.embed import embed

        texts = [t if t.strip() else " " for t in texts]
        return embed(self.model, self.tokenizer, texts, "mean", True, self.batch_size, self.max_tokens)

    @property
    def dim(self) -> int:
        """Vector width."""
        return self.model.cfg.d_model

    @cached_property
    def fingerprint(self) -> list[float]:
        """The first 8 numbers of a fixed sentence's vector: two encoders that agree here are the same model."""
        return [round(float(x), 5) for x in self.encode([PROBE])[0, :8]]
