"""The quantized decode matmuls alone: lmlab::int8_linear (per channel) and lmlab::int4_linear (groups
of 32) at one row of x, on SmolLM2-135M's shapes, with lmlab::skinny_linear on float32 weights beside
them; billions of weights per second (Gw/s) at 1 and 2 threads, best of --repeats. Then the prefill
side: one 512-row matmul (what int8/int4 prefill hands BLAS after dequantizing a tile) in float32 and
in bfloat16, GFLOP/s at 2 threads, the bound on exact prefill and what bf16 activations would buy.

At batch 1 these kernels are bound by the instructions that turn codes into floats, not by memory
(the matrices below stay in cache), so Gw/s is what a kernel change moves. To compare two versions
of the kernels, run this at each commit (the library is rebuilt when its sources change):

    .venv/bin/python benchmarks/quant_kernels.py [--repeats 5]

It also prints int4_linear at 1-16 rows of x beside float32 BLAS on the same shape (GMAC/s, 1 thread).
"""

from __future__ import annotations

import argparse
import time

import torch

from lmlab.kernels import quant

SHAPES = {"q, o (576 x 576)": (576, 576), "gate, up (1536 x 576)": (1536, 576), "down (576 x 1536)": (576, 1536),
          "head (49152 x 576)": (49152, 576)}  # fmt: skip


def best_s(op, args: tuple, calls: int, repeats: int) -> float:
    def fn():
        return op(*args)

    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not quant.available():
        raise SystemExit("the quantized kernels do not run on this machine (AVX-512 and a compiler are needed)")
    torch.manual_seed(0)
    print(f"{'threads':>7}  {'shape':<24}{'int8 Gw/s':>10}{'int4 Gw/s':>10}{'fp32 GB/s':>10}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            x = torch.randn(1, k)
            q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1)
            q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
            s4, o4 = torch.rand(n, k // 32), torch.rand(n, k // 32)
            w = torch.randn(n, k)
            calls = max(5, 20_000_000 // (n * k))
            ops = torch.ops.lmlab
            t8 = best_s(ops.int8_linear, (x, q8, s8, None), calls, args.repeats)
            t4 = best_s(ops.int4_linear, (x, q4, s4, o4, None), calls, args.repeats)
            t32 = best_s(ops.skinny_linear, (x, w, None), calls, args.repeats)
            print(
                f"{threads:>7}  {name:<24}{n * k / t8 / 1e9:>10.1f}{n * k / t4 / 1e9:>10.1f}{4 * n * k / t32 / 1e9:>10.1f}"
            )

    # several rows (a speculative check, a short prefill, a batch): the codes are turned into floats
    # once per row pair and multiplied with up to 8 rows of x, so from a few rows on the float32
    # multiply-adds set the pace; beside them, the same multiply-adds in BLAS's float32 GEMM
    torch.set_num_threads(1)
    n, k = SHAPES["gate, up (1536 x 576)"]
    q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s4, o4 = torch.rand(n, k // 32), torch.rand(n, k // 32)
    print(
        "int4_linear at several rows, gate/up shape, 1 thread (in cache): GMAC/s (multiply-adds of a row of x by a weight)"
    )
    for rows in (1, 2, 4, 5, 8, 16):
        t = best_s(torch.ops.lmlab.int4_linear, (torch.randn(rows, k), q4, s4, o4, None), 200, args.repeats)
        print(f"  {rows:>2} rows  {rows * n * k / t / 1e9:6.1f} GMAC/s  {n * k / t / 1e9:6.1f} Gw/s")
    x, w = torch.randn(512, k), torch.randn(n, k)
    t = best_s(torch.nn.functional.linear, (x, w), 10, args.repeats)
    print(f"  float32 BLAS, 512 rows: {512 * n * k / t / 1e9:6.1f} GMAC/s")

    torch.set_num_threads(2)
    x, w = torch.randn(512, 576), torch.randn(1536, 576)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = best_s(torch.nn.functional.linear, (x.to(dtype), w.to(dtype)), 10, args.repeats)
        rates[dtype] = 2 * 512 * 576 * 1536 / t / 1e9
    print(f"prefill matmul (512 x 576 @ 576 x 1536), 2 threads: float32 {rates[torch.float32]:.0f} GFLOP/s, "
          f"bfloat16 {rates[torch.bfloat16]:.0f} GFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
