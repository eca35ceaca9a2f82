"""Tiny chat checkpoints (SmolLM2's tokenizer and template on a 2-layer LLaMA) and small pair/prompt files."""

from __future__ import annotations

import pytest
import torch

from tests.finetune.conftest import tiny_chat_llama, write_jsonl  # noqa: F401 (fixture re-export)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tiny_chat_llama):  # noqa: F811
    """A reward model (one-label sequence classifier) on the tiny chat trunk."""
    from lmlab.model import load_pretrained, save_pretrained

    torch.manual_seed(1)
    model, tok = load_pretrained(tiny_chat_llama, head="seq_cls", num_labels=1, labels=["reward"])
    out = tmp_path_factory.mktemp("tiny-rm")
    save_pretrained(model, tok, out)
    return out
