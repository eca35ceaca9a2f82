"""Fixtures for the server tests: a tiny random model with SmolLM2's real tokenizer, and real server processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.serve.server import launched
from lmlab.utils.packaged import packaged_path

KEY = "sk-lmlab-test"


def make_tiny(directory: Path) -> Path:
    """A 2-layer random llama over SmolLM2's tokenizer (vocab 49152), saved as a checkpoint."""
    tok = lmlab.load_tokenizer(packaged_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", vocab_size=49152, max_seq_len=2048, eos_token_id=tok.eos_token_id)
    lmlab.save_pretrained(lmlab.Transformer(cfg), tok, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return lmlab.load_pretrained(tiny_dir)


def running_server(model, *flags: str):
    """A real `lmlab serve` process on a free loopback port (see lmlab.serve.server.launched)."""
    return launched(model, *flags)


@pytest.fixture(scope="session")
def tiny_server(tiny_dir):
    """The tiny model behind an API key, with the default batch and queue sizes (one per test worker; tests that
    read /metrics compare before and after, so they hold whatever ran earlier)."""
    # eager steps: these tests are about the API; compiled steps are tested in test_engine.py (and
    # through HTTP, as `lmlab serve` runs by default, in test_batching_smollm2.py)
    with running_server(tiny_dir, "--api-key", KEY, "--no-compile") as url:
        yield url


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}
