"""Data: fetch real corpora, clean/filter/dedup them in one streaming pass, tokenize into shards, serve windows."""

from lmlab.data.clean import clean, load_config
from lmlab.data.readers import Doc, read_documents
from lmlab.data.registry import DATASETS, fetch
from lmlab.data.report import Report
from lmlab.data.shards import tokenize_files
from lmlab.data.token_dataset import TokenDataset

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
