"""Training attention: lmlab's CPU kernel (kernels/attention.py) against SDPA, forward and backward.

llama-17m's shape (batch 8, 6 heads, T 256, head_dim 64, float32, causal), q/k/v laid out as the
projections make them. Rows: attention alone, and with RoPE (the kernel rotates q and k as it reads
them; SDPA's side applies `model.rope.apply_rope` first, on lmlab's fused RoPE kernel, as the model
does without the attention kernel).
Interleaved in this process, median of `--repeats`; lmlab's allocator setting for both.

    .venv/bin/python benchmarks/attention.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmlab.kernels import attention
from lmlab.model.rope import apply_rope
from lmlab.utils.malloc import keep_freed_memory

B, H, T, D = 8, 6, 256, 64


def step(ours: bool, rope: tuple[torch.Tensor, torch.Tensor] | None):
    """Forward and backward of one attention call, as a function of fresh leaf q, k, v."""
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    g = torch.randn(B, T, H, D).transpose(1, 2)

    def run() -> None:
        q.grad = k.grad = v.grad = None  # each run's gradients are fresh, not added to the last ones
        if ours:
            y = attention.attention(q, k, v, True, rope)
        else:
            qr, kr = (apply_rope(q, *rope), apply_rope(k, *rope)) if rope else (q, k)
            y = F.scaled_dot_product_attention(qr, kr, v, is_causal=True)
        y.backward(g)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    keep_freed_memory()
    q = torch.empty(B, T, H, D).transpose(1, 2)
    if not attention.applies(q, q, q, causal=True, masked=False, dropout=0.0):
        print("lmlab's attention kernel does not run here (no kernels built, or too few heads per thread)")
        return
    angles = (torch.randn(1, 1, T, D), torch.randn(1, 1, T, D))
    print(f"B {B}, H {H}, T {T}, head_dim {D}, causal, float32, {torch.get_num_threads()} threads; fwd + bwd, ms")
    print(f"{'':<16}{'lmlab':>8}{'SDPA':>8}{'ratio':>8}")
    for name, rope in [("attention", None), ("RoPE + attention", angles)]:
        runs = {ours: step(ours, rope) for ours in (True, False)}
        times = {True: [], False: []}
        for ours in runs:
            runs[ours]()  # warm-up
        for _ in range(args.repeats):
            for ours, run in runs.items():
                t = time.perf_counter()
                run()
                times[ours].append(time.perf_counter() - t)
        a, b = (statistics.median(times[o]) * 1e3 for o in (True, False))
        print(f"{name:<16}{a:>8.2f}{b:>8.2f}{b / a:>7.2f}x")


if __name__ == "__main__":
    main()
