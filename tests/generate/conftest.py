"""Fixtures shared by the generation tests."""

from __future__ import annotations

import threading

import pytest

from lmlab.generate import decode


@pytest.fixture
def pending_warmups(monkeypatch) -> list:
    """`decode.warmup` as a compile that never finishes (so everything runs eagerly); the list it returns
    gets (id(model), batch, capacity, width) for each graph asked for, in order."""

    class Pending:
        ready, failed = threading.Event(), None

    asked: list = []

    def warmup(model, batch, capacity, device, key=None, width=0):
        asked.append((id(model), batch, capacity, width))
        return Pending

    monkeypatch.setattr(decode, "warmup", warmup)
    return asked
