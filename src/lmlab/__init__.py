"""lmlab: every step of building a large language model, as a command you can run and a module you can read."""

from __future__ import annotations

import importlib
from typing import Any

from lmlab.errors import LmlabError

# loaded on first use: `import lmlab.data` (a data worker on a cluster) must not pay for torch
_LAZY = {
    "generate": ("lmlab.generate", None),
    "GenerationConfig": ("lmlab.generate", "GenerationConfig"),
    "stream": ("lmlab.generate", "stream"),
    "PRESETS": ("lmlab.model", "PRESETS"),
    "ModelConfig": ("lmlab.model", "ModelConfig"),
    "Transformer": ("lmlab.model", "Transformer"),
    "load_pretrained": ("lmlab.model", "load_pretrained"),
    "save_pretrained": ("lmlab.model", "save_pretrained"),
    "Tokenizer": ("lmlab.tokenizer", "Tokenizer"),
    "load_tokenizer": ("lmlab.tokenizer", "load_tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "GenerationConfig",
    "LmlabError",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "stream",
]
