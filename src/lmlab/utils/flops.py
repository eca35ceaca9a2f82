"""How fast this machine multiplies matrices: the peak that MFU is measured against."""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype` (the best of repeated timings)."""
    # values do not matter; a private generator leaves the global RNG (dropout, sampling) untouched
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
