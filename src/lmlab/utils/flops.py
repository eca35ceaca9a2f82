"""How fast this machine multiplies matrices: the peak that MFU is measured against."""

from __future__ import annotations

import functools
import time

import torch

from lmlab.utils.device import policy, synchronize


def measure_matmul_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    seconds: float = 0.5,
    repeats: int = 10,
) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype`: the best of at least `repeats` timings
    over at least `seconds`. Measured once per process and (device, dtype, n): a second measurement in
    a busy process (data loader threads, another run) would only come out lower. n defaults to the
    device policy's size (2048 on a CPU, 8192 on a GPU: a small matmul understates a GPU's peak)."""
    device = torch.device(device)
    return _measure(device, dtype, n or policy(device).peak_matmul_n, seconds, repeats)


@functools.cache
def _measure(device: torch.device, dtype: torch.dtype, n: int, seconds: float, repeats: int) -> float:
    # values do not matter; a private generator leaves the global RNG (dropout, sampling) untouched
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up
    synchronize(device)
    best, count, start = float("inf"), 0, time.perf_counter()
    while count < repeats or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
        count += 1
    return 2 * n**3 / best
