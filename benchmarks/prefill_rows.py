"""A short float32 prefill with its weight matmuls through lmlab's skinny kernel against MKL, in one
process, interleaved call by call, for prompt lengths around `cpu_kernels.LINEAR_MAX_ROWS`.

A chat turn with its conversation's keys/values kept prefills some 20 tokens, a speculative check 5,
a server's batch up to its --max-batch rows: few rows, where MKL packs each weight before use and the
skinny kernel reads each weight once for all rows. The ratio printed is MKL's time over the kernel's.

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_rows.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lmlab.generate import cpu_kernels
from lmlab.generate.kv_cache import KVCache
from lmlab.model.checkpoint import load_pretrained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", default="8,16,17,24,32,48,64,96,128")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    if not cpu_kernels.available():
        print("the decode kernels do not run on this machine (x86 AVX-512 and a C++ compiler)")
        return 0
    model, _ = load_pretrained(args.model, dequantize=True)
    model.eval()
    limit = cpu_kernels.LINEAR_MAX_ROWS

    def once(ids: torch.Tensor, kernel_rows: int) -> float:
        cpu_kernels.LINEAR_MAX_ROWS = kernel_rows
        T = ids.shape[1]
        with torch.inference_mode(), cpu_kernels.for_rows(T, "cpu"):
            cache = KVCache.for_model(model, 1, T)
            t = time.perf_counter()
            model(ids, kv_cache=cache, logits_to_keep=1)
            return time.perf_counter() - t

    print(f"{args.model} float32 prefill, {torch.get_num_threads()} threads; the default uses the kernel up to "
          f"{limit} rows")  # fmt: skip
    print(f"{'tokens':>6} {'MKL ms':>8} {'kernel ms':>10} {'MKL / kernel':>13}")
    try:
        for T in map(int, args.rows.split(",")):
            ids = torch.randint(100, 30000, (1, T))
            mkl, kernel = [], []
            for _ in range(args.repeats):
                mkl.append(once(ids, 0))
                kernel.append(once(ids, 1 << 20))
            a, b = statistics.median(mkl[2:]), statistics.median(kernel[2:])
            print(f"{T:>6} {a * 1e3:>8.1f} {b * 1e3:>10.1f} {a / b:>12.2f}x")
    finally:
        cpu_kernels.LINEAR_MAX_ROWS = limit
    return 0


if __name__ == "__main__":
    sys.exit(main())
