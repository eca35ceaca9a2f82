"""Data: fetch real corpora, clean/filter/dedup them in one streaming pass, tokenize into shards, serve windows."""

from __future__ import annotations

from typing import Any

# eager: these functions share names with submodules (data/clean.py, data/fetch.py), and the package attribute must
# be the function whatever was imported first; none of them imports torch
from lmlab.data.clean import clean, load_config
from lmlab.data.readers import Doc, read_documents
from lmlab.data.registry import DATASETS, fetch
from lmlab.data.report import Report
from lmlab.data.shards import tokenize_files


def __getattr__(name: str) -> Any:
    # TokenDataset imports torch: loaded on first use, so cleaning workers (local pool or Ray) never import it
    if name == "TokenDataset":
        from lmlab.data.token_dataset import TokenDataset

        return TokenDataset
    raise AttributeError(f"module 'lmlab.data' has no attribute {name!r}")


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
