"""Forward throughput: lmlab vs transformers' LlamaForCausalLM on the same weights, side by side.

A ~30M-parameter LLaMA config, batch 8 x 256, fp32 and bf16; runs alternate between the two
implementations so machine noise hits both alike, and the median of each is compared.

    .venv/bin/python benchmarks/forward.py [--repeats 7] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

import lmlab
from lmlab.model.info import count_params


def _time(fn, repeats: int) -> list[float]:
    return [_once(fn) for _ in range(repeats)]


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-30m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    cfg = lmlab.ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = lmlab.Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        lmlab.save_pretrained(ours, None, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(
        f"{args.preset}: {count_params(cfg)['total'] / 1e6:.1f}M parameters, batch {args.batch} x {args.seq}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'dtype':<10}{'lmlab tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}{'max |diff|':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        with torch.inference_mode():
            diff = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
            ours_t, theirs_t = [], []
            for _ in range(args.repeats):  # interleaved
                ours_t.append(_once(lambda: ours(ids)))
                theirs_t.append(_once(lambda: theirs(ids)))
        a, b = tokens / statistics.median(ours_t), tokens / statistics.median(theirs_t)
        name = str(dtype).removeprefix("torch.")
        print(f"{name:<10}{a:>14,.0f}{b:>20,.0f}{a / b:>7.2f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
