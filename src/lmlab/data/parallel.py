"""An ordered, bounded parallel map: workers process batches while the reader streams, memory stays flat."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def _context(start_method: str) -> Any:
    # fork starts workers in milliseconds and, unlike spawn, does not re-run a user's unguarded script in each child;
    # spawn only where fork does not exist (Windows). Workers that use tokenizers turn its thread pool off.
    if start_method == "fork" and "fork" not in mp.get_all_start_methods():
        start_method = "spawn"
    return mp.get_context(start_method)


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    max_pending: int | None = None,
    start_method: str = "fork",
) -> Iterator[Any]:
    """fn over items in `workers` processes, results in input order, at most max_pending items in flight.

    Pool.imap would read the whole input ahead of the workers; the bound keeps memory flat on any input size.
    workers <= 1 runs in this process (no pickling, easy to debug).
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    max_pending = max_pending or 4 * workers
    with _context(start_method).Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
