"""Shared fixtures: tiny random Hugging Face models and the packaged real checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs one process per core: more threads than cores makes torch's OpenMP threads wait on
# each other (a tiny model's step measured 10x slower with 2 workers x 2 threads on 2 cores)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


def hf_tiny(model_type: str, seed: int = 0, task: str | None = None, **overrides):
    """A tiny random transformers model (no download), initialized with a wide spread so bugs show.

    task "seq_cls" / "token_cls" builds the family's *ForSequenceClassification / *ForTokenClassification.
    """
    import transformers

    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1)
    if model_type in ("llama", "mistral", "qwen2"):
        base.update(intermediate_size=96, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gpt2":
        base = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1)
    if model_type == "bert":
        base.update(intermediate_size=128, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    base.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    if task is not None:
        auto = {"seq_cls": transformers.AutoModelForSequenceClassification,
                "token_cls": transformers.AutoModelForTokenClassification}[task]  # fmt: skip
        model = auto.from_config(config)
    elif model_type == "bert" and "BertModel" in (config.architectures or []):
        model = transformers.BertModel(config)
    elif model_type == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # LayerNorm/RMSNorm weights start at 1 and biases at 0: make them random too
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from lmlab.utils.packaged import packaged_path

    return packaged_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm_dir():
    from lmlab.utils.packaged import packaged_path

    return packaged_path("all-minilm-l6-v2")
