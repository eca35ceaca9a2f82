"""TokenDataset: (input, target) windows from token shards, random or sequential, deterministic and resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError


class TokenDataset:
    """Windows of block_size + 1 tokens from `{split}.bin` (memory-mapped, never read whole).

    mode="random": each batch draws window starts from a generator seeded by (seed, step), so batch k is the same
    whether or not the run was interrupted before it. mode="sequential": consecutive non-overlapping windows,
    wrapping around at the end (one pass = one epoch). `state_dict()` / `load_state_dict()` carry the position.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        block_size: int = 256,
        batch_size: int = 8,
        mode: str = "random",
        seed: int = 0,
    ) -> None:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise LmlabError("no meta.json here", file=str(path), hint="make shards with `lmlab data tokenize`")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        if split not in self.meta["splits"]:
            raise LmlabError(f"no split {split!r}; have {', '.join(self.meta['splits'])}", file=str(meta_file))
        if mode not in ("random", "sequential"):
            raise LmlabError(f"mode must be random or sequential, not {mode!r}", field="mode")
        self.tokens = np.memmap(path / self.meta["splits"][split]["file"], dtype=np.dtype(self.meta["dtype"]), mode="r")
        if len(self.tokens) < block_size + 1:
            raise LmlabError(
                f"{split} has {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}",
                file=str(path), hint="use a smaller block_size or more data",
            )  # fmt: skip
        self.block_size, self.batch_size, self.mode, self.seed = block_size, batch_size, mode, seed
        self.step = 0

    def __len__(self) -> int:
        """Number of non-overlapping windows (the sequential epoch length)."""
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window i of the sequential order: (input, target), target shifted by one token."""
        start = (i % len(self)) * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def _starts(self, step: int) -> np.ndarray:
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        first = step * self.batch_size
        return (np.arange(first, first + self.batch_size) % len(self)) * self.block_size

    def get_batch(self, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` (default: the next one, advancing the position): x, y of shape (batch_size, block_size)."""
        if step is None:
            step, self.step = self.step, self.step + 1
        starts = self._starts(step)
        chunks = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(chunks[:, :-1].copy())
        y = torch.from_numpy(chunks[:, 1:].copy())
        return x, y  # (B, T) each

    def __iter__(self):
        while True:
            yield self.get_batch()

    @property
    def epoch(self) -> float:
        """Fraction of the split's tokens seen so far (batches x tokens per batch / split size)."""
        return self.step * self.batch_size * self.block_size / len(self.tokens)

    def state_dict(self) -> dict[str, Any]:
        """The position to save in a checkpoint."""
        return {"step": self.step, "seed": self.seed, "mode": self.mode, "batch_size": self.batch_size,
                "block_size": self.block_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; a different seed, mode or shape would silently change the data order."""
        for key in ("seed", "mode", "batch_size", "block_size"):
            if state.get(key) != getattr(self, key):
                raise LmlabError(
                    f"resume state has {key}={state.get(key)!r}, dataset has {getattr(self, key)!r}", field=key
                )
        self.step = int(state["step"])
