"""`lmlab data tokenize --engine ray`: blocks tokenized in parallel on a Ray cluster into the same train.bin,
val.bin and meta.json as the local engine, byte for byte.

Three waves of tasks: tokenize each block (staged .npy), count each block's train/val tokens (the split of a
document hangs on its global index, known once the blocks' document counts are), then write each block's tokens
at its own offsets of the preallocated output files. No process holds more than one block.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data import shards
from lmlab.data.blocks import Block, count_lines, default_block_bytes, number_blocks, plan_blocks, read_block
from lmlab.data.ray_shuffle import connect, error_dict, remote
from lmlab.data.readers import list_files
from lmlab.data.shards import finish_shards, is_validation, shard_tokenizer
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_path
from lmlab.utils.progress import progress_bar

BATCH_DOCS = 256


def tokenize_block(block: Block, tokenizer: str, text_field: str, stage: Path) -> dict[str, Any]:
    """Ids of every document of the block, each followed by EOS, staged as one array plus per-document lengths."""
    shards._init_worker(tokenizer)  # the local engine's worker set-up and encoder: the same ids by construction
    pieces: list[np.ndarray] = []
    n_bytes, batch = 0, []
    try:
        for doc in read_block(block, text_field):
            batch.append(doc.text)
            n_bytes += len(doc.text.encode("utf-8"))
            if len(batch) == BATCH_DOCS:
                pieces += shards._encode_batch(batch)
                batch = []
    except LmlabError as e:
        return {"error": error_dict(e)}
    if batch:
        pieces += shards._encode_batch(batch)
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=shards._TOK["dtype"])
    np.save(stage / f"block-{block.index:06d}.ids.npy", ids)
    np.save(stage / f"block-{block.index:06d}.len.npy", lengths)
    return {"docs": len(lengths), "bytes": n_bytes}


def _splits(stage: Path, block: int, first_doc: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's per-document token counts and which documents go to val (by global document index)."""
    lengths = np.load(stage / f"block-{block:06d}.len.npy")
    val = np.array([is_validation(first_doc + i, val_fraction, seed) for i in range(len(lengths))], dtype=bool)
    return lengths, val


def count_splits(stage: Path, block: int, first_doc: int, val_fraction: float, seed: int) -> tuple[int, int, int, int]:
    """(train tokens, val tokens, train docs, val docs) of one block."""
    lengths, val = _splits(stage, block, first_doc, val_fraction, seed)
    return int(lengths[~val].sum()), int(lengths[val].sum()), int((~val).sum()), int(val.sum())


def write_block(
    stage: Path, block: int, first_doc: int, val_fraction: float, seed: int, paths: tuple[str, str],
    offsets: tuple[int, int],
) -> None:  # fmt: skip
    """Write a block's documents into train/val at its offsets (in tokens), in document order."""
    ids = np.load(stage / f"block-{block:06d}.ids.npy")
    lengths, val = _splits(stage, block, first_doc, val_fraction, seed)
    doc_of_token = np.repeat(val, lengths)
    for split, (path, offset) in enumerate(zip(paths, offsets)):
        data = ids[doc_of_token == bool(split)].tobytes()
        if data:
            fd = os.open(path, os.O_WRONLY)
            try:
                done, at = 0, offset * ids.itemsize
                while done < len(data):  # one call writes at most ~2 GiB on Linux
                    done += os.pwrite(fd, memoryview(data)[done:], at + done)
            finally:
                os.close(fd)


def tokenize_ray(
    tokenizer: str | os.PathLike,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int = 2,
    text_field: str = "text",
    block_mb: float = 64,
    progress: bool = True,
    address: str | None = None,
) -> dict[str, Any]:
    """`tokenize_files` on Ray: the same files and meta (but "seconds"); returns meta."""
    start = time.perf_counter()
    tok, dtype = shard_tokenizer(tokenizer)
    files = list_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ray = connect(address, workers)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    total = sum(f.stat().st_size for f in files)
    blocks = plan_blocks(files, default_block_bytes(total, cpus, block_mb))
    if any(b.end is not None for b in blocks):
        blocks = number_blocks(blocks, ray.get([remote(count_lines).remote(b) for b in blocks]))
    stage = out / f".ray-staging-{os.getpid()}"
    stage.mkdir(parents=True, exist_ok=True)
    try:
        refs = [remote(tokenize_block).remote(b, str(tokenizer), text_field, stage) for b in blocks]
        bar = progress_bar(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
        done = []
        for b, ref in zip(blocks, refs):  # in order: the first bad block raised is the one the local engine hits
            done.append(ray.get(ref))
            bar.update(b.bytes)
            if "error" in done[-1]:
                for later in refs[len(done) :]:
                    ray.cancel(later)
                raise LmlabError(**done[-1]["error"])
        bar.close()
        first_doc = np.r_[0, np.cumsum([d["docs"] for d in done])[:-1]].astype(int).tolist() if done else []
        counts = ray.get([remote(count_splits).remote(stage, b.index, first_doc[b.index], val_fraction, seed)
                          for b in blocks])  # fmt: skip
        train_off = np.r_[0, np.cumsum([c[0] for c in counts])].astype(int).tolist()
        val_off = np.r_[0, np.cumsum([c[1] for c in counts])].astype(int).tolist()
        with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
            os.truncate(train_tmp, train_off[-1] * dtype.itemsize)
            os.truncate(val_tmp, val_off[-1] * dtype.itemsize)
            ray.get([
                remote(write_block).remote(stage, b.index, first_doc[b.index], val_fraction, seed,
                                           (str(train_tmp), str(val_tmp)), (train_off[b.index], val_off[b.index]))
                for b in blocks
            ])  # fmt: skip
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    stats = {
        "train": {"file": "train.bin", "tokens": train_off[-1], "docs": sum(c[2] for c in counts)},
        "val": {"file": "val.bin", "tokens": val_off[-1], "docs": sum(c[3] for c in counts)},
    }
    return finish_shards(out, tok, dtype, val_fraction, seed, stats, files, sum(d["bytes"] for d in done), start)
