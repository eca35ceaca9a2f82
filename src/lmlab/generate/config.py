"""Generation settings, validated once with messages that name the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError


@dataclass
class GenerationConfig:
    """How to turn a prompt into text. temperature 0 means greedy; > 0 samples from the processed distribution."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # beam search: True, False (heuristic) or "never"
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)  # stop strings; the output ends before the first one
    stop_token_ids: list[int] | None = None  # None: the tokenizer's / model's EOS
    seed: int | None = None
    logprobs: bool = False  # record each chosen token's log-probability under the model
    # decode steps as one torch.compile graph over a static KV cache: a compile (tens of seconds on
    # a small CPU, a few with inductor's warm on-disk cache) per new batch size or capacity, then
    # faster steps. True waits for it; "auto" compiles in a background thread while eager steps
    # over the same static cache produce the first tokens, and switches once the graph is ready
    # (what the CLI, chat and serve use); False never compiles.
    compile: bool | str = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1.0 turns it off)"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must be >= 0"),
            ("num_beams", self.num_beams >= 1, "must be >= 1"),
            ("num_return_sequences", self.num_return_sequences >= 1, "must be >= 1"),
            ("early_stopping", self.early_stopping in (True, False, "never"), "must be true, false or 'never'"),
            ("compile", self.compile in (True, False, "auto"), "must be true, false or 'auto'"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise LmlabError(f"{getattr(self, name)!r} {why}", field=name)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise LmlabError("cannot return more sequences than beams", field="num_return_sequences")
        if self.num_beams > 1 and self.temperature > 0:
            raise LmlabError(
                "beam search here is deterministic; use temperature 0 with num_beams > 1", field="num_beams"
            )

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random rather than taken greedily."""
        return self.temperature > 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
