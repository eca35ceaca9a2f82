"""Fixtures shared by the generation tests."""

from __future__ import annotations

import threading

import pytest
import torch

import lmlab
from lmlab.generate import decode
from lmlab.model.config import ModelConfig


def tiny_llama(seed: int, **kw) -> lmlab.Transformer:
    """A random llama-tiny (weights wide enough to give varied tokens, no EOS) seeded with `seed`: the
    target and drafts of the speculative and prompt-cache tests."""
    torch.manual_seed(seed)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.1, eos_token_id=None, **kw)).eval()


@pytest.fixture
def pending_warmups(monkeypatch) -> list:
    """`decode.warmup` as a compile that never finishes (so everything runs eagerly); the list it returns
    gets (id(model), batch, capacity, width) for each graph asked for, in order (a tree graph's with
    "tree" after it)."""

    class Pending:
        ready, failed = threading.Event(), None

    asked: list = []

    def warmup(model, batch, capacity, device, key=None, width=0, tree=False):
        asked.append((id(model), batch, capacity, width, "tree") if tree else (id(model), batch, capacity, width))
        return Pending

    monkeypatch.setattr(decode, "warmup", warmup)
    return asked
