"""Keeping freed memory in the process: glibc malloc settings for steps that allocate the same
large tensors again and again.

By default glibc hands freed memory back to the kernel: blocks above a (moving) size threshold
are unmapped on free, and the top of the heap is trimmed once enough of it is free. A training
step frees its activations in backward and allocates them again in the next forward, so every
step faults the same pages back in: for the 17M benchmark model ~17,000 page faults (70 MB) and
~2.5% of the step on a 2-core Xeon (transformers' step: ~70,000 and 4%). jemalloc or tcmalloc via
LD_PRELOAD fix this but must be set before the process starts; mallopt() does it from inside.

`lmlab` commands call `keep_freed_memory()` at start (LMLAB_TUNE_MALLOC=0 turns that off); the
library never changes a process-wide setting by itself. The cost: memory freed after a peak stays
with the process (up to `trim` bytes), which for a training or serving process is the next
step's anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems


@functools.cache
def keep_freed_memory(trim: int = 1 << 30) -> bool:
    """Tell glibc to serve blocks up to 32 MB from its heap and to keep up to `trim` bytes of free
    heap instead of returning them; False (and nothing changed) where libc is not glibc."""
    if not 0 <= trim < 2**31:
        raise ValueError(f"trim must be in [0, 2**31), not {trim}")  # mallopt takes a C int
    if os.environ.get("LMLAB_TUNE_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    except (OSError, AttributeError):
        return False


@functools.cache
def small_footprint(mmap_threshold: int = 256 << 10) -> bool:
    """The opposite trade to `keep_freed_memory`: blocks from `mmap_threshold` up are mapped on their own
    and unmapped when freed, and glibc stops raising that threshold after each free. By default it does
    raise it (up to 32 MB), so a forward's many few-MB temporaries move onto the heap, where the holes
    they leave between saved activations stay resident: measured on SmolLM2 LoRA SFT (2 x 256 tokens),
    2.5 GB after the forward by default against 1.9 GB with this. Costs page faults (a few % of a step);
    for processes that must fit a small machine (the demo). False where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """Collect Python garbage and hand glibc's free heap back to the kernel (malloc_trim): between the
    stages of a long process (the demo), so that one stage's freed tensors do not stay resident while
    the next allocates its own. False where libc is not glibc."""
    import gc

    gc.collect()
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def resident_mb() -> float:
    """This process's resident memory now, in MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0
