"""Small deterministic data and models for Trainer tests."""

from __future__ import annotations

import torch

import lmlab
from lmlab.train import TrainConfig


class RandomTokens:
    """A stand-in for TokenDataset: batch `step` is a pure function of (seed, step)."""

    def __init__(self, batch_size: int, block_size: int = 16, vocab: int = 512, seed: int = 0) -> None:
        self.batch_size, self.block_size, self.vocab, self.seed, self.step = batch_size, block_size, vocab, seed, 0

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        # a learnable pattern (each token follows from the previous one) plus noise
        start = torch.randint(0, self.vocab, (self.batch_size, 1), generator=g)
        seq = (start + 7 * torch.arange(self.block_size + 1)) % self.vocab
        noise = torch.rand(seq.shape, generator=g) < 0.1
        seq = torch.where(noise, torch.randint(0, self.vocab, seq.shape, generator=g), seq)
        return seq[:, :-1], seq[:, 1:]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.step = d["step"]


def tiny_model(seed: int = 0, **overrides) -> lmlab.Transformer:
    torch.manual_seed(seed)
    return lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny", **overrides))


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / "run"), max_steps=6, micro_batch_size=8, block_size=16, lr=1e-2, warmup_steps=2,
        eval_every=3, eval_batches=2, log_every=1,
    )  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)
