"""Ray plumbing shared by the distributed data stages: connecting to a cluster, and hash shuffles of numpy columns.

A shuffle here is Ray's plain map/reduce pattern: each map task returns P objects (`num_returns=P`), one per
partition, and reduce task p receives the p-th object of every map task. Objects live in Ray's object store
(spilled to disk when it fills), so no process ever holds more than its partition.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lmlab.errors import LmlabError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def import_ray() -> Any:
    """Ray, or a clear error saying how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise LmlabError(
            "the ray engine needs Ray", field="engine", hint="pip install 'lmlab[ray]' (or use --engine local)"
        ) from None
    return ray


def error_dict(e: LmlabError) -> dict[str, Any]:
    """A bad-input error as a task's return value; the driver raises `LmlabError(**it)` in input order."""
    return {"message": e.message, "file": e.file, "line": e.line, "field": e.field, "hint": e.hint}


def connect(address: str | None = None, workers: int | None = None) -> Any:
    """Join the Ray cluster at `address` ('auto': the one this machine belongs to), or start a local one with
    `workers` CPUs; an already-initialised Ray (a test's, a notebook's) is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # workers import lmlab from the same interpreter and PYTHONPATH as this process
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


@functools.cache
def remote(fn: Callable, **options: Any) -> Any:
    """fn as a Ray remote function (made once per function and options)."""
    ray = import_ray()
    return ray.remote(**options)(fn) if options else ray.remote(fn)


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """Partition (0..parts-1) of each 64-bit key: a multiplicative hash, so sequential keys spread evenly."""
    with np.errstate(over="ignore"):
        return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(33)) % np.uint64(parts)


def scatter(part: np.ndarray, parts: int, *columns: np.ndarray) -> Any:
    """Rows split by partition: a list of `parts` tuples of columns (a bare tuple when parts == 1, which is how a
    Ray task with num_returns=1 must return)."""
    idx = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[idx], np.arange(parts + 1))
    out = [tuple(c[idx[a:b]] for c in columns) for a, b in itertools.pairwise(bounds)]
    return out[0] if parts == 1 else out


def gather(pieces: tuple, width: int, dtypes: tuple | None = None) -> list[np.ndarray]:
    """Concatenate the column tuples a reduce task received from every map task."""
    if not pieces:
        return [np.zeros(0, dtype=(dtypes or [np.int64] * width)[i]) for i in range(width)]
    return [np.concatenate([p[i] for p in pieces]) for i in range(width)]


def as_list(refs: Any, n: int) -> list:
    """The object refs of a task started with num_returns=n, always as a list."""
    return [refs] if n == 1 else list(refs)


def held_bytes(*arrays: np.ndarray) -> int:
    """Bytes of the columns a task holds: its share of a shuffle."""
    return int(sum(a.nbytes for a in arrays))
