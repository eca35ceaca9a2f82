"""Token shards: documents encoded in parallel, joined by EOS, split train/val by document, written as .bin + meta.json."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.parallel import parallel_map
from lmlab.data.readers import Doc, list_files, read_documents
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_path, write_json
from lmlab.utils.progress import progress_bar

TOKENIZER_DIR = "tokenizer"  # inside the shards folder

_TOK: dict[str, Any] = {}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab below 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_validation(doc_index: int, val_fraction: float, seed: int) -> bool:
    """Deterministic train/val assignment of a document by a hash of (seed, index): same on every run and worker count."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


def _init_worker(tokenizer_dir: str) -> None:
    from lmlab.tokenizer.tokenizer import load_tokenizer

    # a forked worker must not use the Rust thread pool its parent may have started (it would deadlock);
    # the worker processes are the parallelism here
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer_dir)
    _TOK.update(tok=tok, eos=tok.eos_token_id, dtype=token_dtype(tok.vocab_size))


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    """Ids of each text followed by EOS, in the shard dtype (compact to send between processes)."""
    tok, eos, dtype = _TOK["tok"], _TOK["eos"], _TOK["dtype"]
    return [np.array([*ids, eos], dtype=dtype) for ids in tok.encode_batch(texts, add_special_tokens=False)]


def _batches(docs: Iterator[Doc | LmlabError], size: int, sizes: list[int]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        assert isinstance(doc, Doc)
        batch.append(doc.text)
        sizes.append(len(doc.text.encode("utf-8")))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_files(
    tokenizer: str | os.PathLike,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int = 2,
    text_field: str = "text",
    batch_docs: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode files/folders into train.bin and val.bin (documents separated by EOS) plus meta.json; returns meta.

    Bad input raises (clean the data first with `lmlab data clean`). Files appear only when complete.
    """
    tok, dtype = shard_tokenizer(tokenizer)
    files = list_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {s: {"file": f"{s}.bin", "tokens": 0, "docs": 0} for s in ("train", "val")}
    sizes: list[int] = []
    start = time.perf_counter()
    total_bytes = sum(f.stat().st_size for f in files)
    bar = progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    doc_index = 0
    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:  # noqa: SIM117
        with open(train_tmp, "wb") as ftrain, open(val_tmp, "wb") as fval:
            batches = _batches(read_documents(files, text_field), batch_docs, sizes)
            results = parallel_map(_encode_batch, batches, workers, _init_worker, (str(tokenizer),))
            for arrays in results:
                for ids in arrays:
                    split = "val" if is_validation(doc_index, val_fraction, seed) else "train"
                    (fval if split == "val" else ftrain).write(ids.tobytes())
                    stats[split]["tokens"] += len(ids)
                    stats[split]["docs"] += 1
                    bar.update(sizes[doc_index])
                    doc_index += 1
    bar.close()
    return finish_shards(out, tok, dtype, val_fraction, seed, stats, files, sum(sizes), start)


def shard_tokenizer(tokenizer: str | os.PathLike) -> tuple[Any, np.dtype]:
    """The tokenizer of a shards run (it must have an EOS to separate documents) and the token dtype."""
    from lmlab.tokenizer.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise LmlabError("the tokenizer has no eos_token to separate documents", file=str(tokenizer), field="eos_token")
    return tok, token_dtype(tok.vocab_size)


def finish_shards(
    out: Path, tok: Any, dtype: np.dtype, val_fraction: float, seed: int, stats: dict, files: list[Path],
    input_bytes: int, start: float,
) -> dict[str, Any]:  # fmt: skip
    """Copy the tokenizer into the shards folder and write meta.json (last: a folder with meta.json is complete)."""
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        # a copy inside the folder, named relative to it: the shards move or copy to another machine whole
        "tokenizer": TOKENIZER_DIR,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": stats,
        "inputs": [str(f) for f in files],
        "input_bytes": input_bytes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    tok.save(out / TOKENIZER_DIR)
    write_json(out / "meta.json", meta)
    return meta


def shards_tokenizer(shards: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Where the tokenizer of a shards folder is: meta.json names it relative to the folder (older folders
    hold an absolute path, still read); a clear error when it is gone."""
    path = Path(shards) / meta.get("tokenizer", TOKENIZER_DIR)  # an absolute path stays as it is
    if not path.exists():
        raise LmlabError(
            f"the tokenizer these shards were made with is missing: {path}",
            file=str(Path(shards) / "meta.json"),
            field="tokenizer",
            hint="re-run `lmlab data tokenize`, or copy the tokenizer folder to that path",
        )
    return path
