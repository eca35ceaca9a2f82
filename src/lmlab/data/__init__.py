"""Data: fetch real corpora, clean/filter/dedup them in one streaming pass, tokenize into shards, serve windows."""

from __future__ import annotations

import importlib
from typing import Any

# loaded on first use: the cleaning workers (local pool or Ray) never import torch
_LAZY = {
    "clean": "lmlab.data.clean",
    "load_config": "lmlab.data.clean",
    "Doc": "lmlab.data.readers",
    "read_documents": "lmlab.data.readers",
    "DATASETS": "lmlab.data.registry",
    "fetch": "lmlab.data.registry",
    "Report": "lmlab.data.report",
    "tokenize_files": "lmlab.data.shards",
    "TokenDataset": "lmlab.data.token_dataset",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lmlab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "DATASETS",
    "Doc",
    "Report",
    "TokenDataset",
    "clean",
    "fetch",
    "load_config",
    "read_documents",
    "tokenize_files",
]
