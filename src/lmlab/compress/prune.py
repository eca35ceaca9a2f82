"""`lmlab prune`: load a checkpoint, calibrate, prune by one method, report sparsity, save.

Calibration text comes from a fetched data set, cut into token windows with the model's tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from lmlab.compress.sparsity import apply_masks, check_sparsity, parse_pattern, sparsity_report
from lmlab.errors import LmlabError
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.atomic import write_json

METHODS = ("magnitude", "wanda", "heads", "neurons")


def records_text(tokenizer: Tokenizer, record: dict[str, Any]) -> str:
    """A record as training text: its text, or its chat messages rendered with the chat template."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"])
    return record["text"]


def token_windows(tokenizer: Tokenizer, files: list[Path], block_size: int, max_windows: int | None = None,
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Windows of block_size + 1 tokens (N, block_size + 1) cut from the files' records joined by EOS,
    in a seeded order (mixed corpora interleave)."""
    eos = tokenizer.eos_token_id or 0
    stream: list[int] = []
    enough = max_windows * (block_size + 1) if max_windows else None
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            if enough and len(stream) >= enough * len(files):
                break  # each file may fill the quota: large corpora are not tokenized to the end
            if line.strip():
                stream += [*tokenizer.encode(records_text(tokenizer, json.loads(line)), add_special_tokens=False), eos]
    n = len(stream) // (block_size + 1)
    if n == 0:
        raise LmlabError(f"fewer than {block_size + 1} tokens of data", field="data")
    windows = torch.tensor(stream[: n * (block_size + 1)]).view(n, block_size + 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    windows = windows[order]
    return windows[:max_windows] if max_windows else windows


def calibration_batches(tokenizer: Tokenizer, dataset: str = "kjv", samples: int = 32, length: int = 256,
                        batch: int = 4, split: str = "train") -> list[torch.Tensor]:  # fmt: skip
    """`samples` windows of `length` tokens from a fetched data set's split, in batches (B, length)."""
    from lmlab.data import fetch

    path = Path(dataset) if Path(dataset).is_file() else Path(fetch(dataset)) / f"{split}.jsonl"
    w = token_windows(tokenizer, [path], length - 1, samples)[:, :length]
    return list(w.split(batch))


def prune_model(
    model: Transformer,
    method: str,
    sparsity: float,
    batches: list[torch.Tensor] | None = None,
    pattern: str | None = None,
    scope: str | None = None,
    importance: str = "activation",
    progress: bool = False,
) -> tuple[Transformer, dict[str, Any]]:
    """Prune with one method; returns the pruned model (a new, smaller one for heads/neurons) and a report."""
    from lmlab.compress import magnitude, structured, wanda

    if method not in METHODS:
        raise LmlabError(f"method {method!r} is not one of {', '.join(METHODS)}", field="method")
    if pattern is None or method in ("heads", "neurons"):
        check_sparsity(sparsity)
    if pattern is not None and method in ("heads", "neurons"):
        raise LmlabError("an N:M pattern applies to magnitude and wanda", field="pattern")
    parse_pattern(pattern)
    if method in ("wanda", "heads", "neurons") and not batches:
        raise LmlabError(f"{method} needs calibration data", field="calib")
    info: dict[str, Any] = {"method": method, "sparsity": sparsity, "pattern": pattern}
    if method == "magnitude":
        apply_masks(model, magnitude.magnitude_masks(model, sparsity, scope or "layer", pattern))
    elif method == "wanda":
        wanda.wanda_masks(model, batches, sparsity, pattern, progress=progress)
    else:
        heads, neurons = (sparsity, 0.0) if method == "heads" else (0.0, sparsity)
        model, more = structured.prune_structured(model, batches, heads, neurons, importance, scope or "layer",
                                                  progress)  # fmt: skip
        info.update(more)
    info["report"] = sparsity_report(model)
    return model, info


def prune_checkpoint(
    src: str, out: str, method: str, sparsity: float, pattern: str | None = None, scope: str | None = None,
    calib: str = "kjv", calib_samples: int = 32, calib_len: int = 256, importance: str = "activation",
) -> dict[str, Any]:  # fmt: skip
    """Load `src`, prune it, save it to `out` with prune.json (the method and per-layer sparsity)."""
    check_sparsity(sparsity) if pattern is None else parse_pattern(pattern)
    model, tokenizer = load_pretrained(src)
    batches = None
    if method != "magnitude":
        if tokenizer is None:
            raise LmlabError("calibration needs the checkpoint's tokenizer", file=src)
        batches = calibration_batches(tokenizer, calib, calib_samples, calib_len)
    model, info = prune_model(model, method, sparsity, batches, pattern, scope, importance, progress=True)
    save_pretrained(model, tokenizer, out)
    write_json(Path(out) / "prune.json", info)
    return info
