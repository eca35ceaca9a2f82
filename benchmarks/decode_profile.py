"""Where a compiled batch-1 decode step's time goes: torch.profiler over --steps steps of `lmlab generate`'s
compiled path, the top operators by self time, in ms per step. "TorchDynamo Cache Lookup" is dynamo's per-call
check of the compiled graph's guards (one per weight and cache tensor), paid on every step.

    .venv/bin/python benchmarks/decode_profile.py [--model smollm2-135m-instruct | PATH.gguf] [--steps 64] [--batch 16]

It first prints the step's wall time without the profiler (median of 3 runs, after the compile):
with --batch 16 that shows a 16-row step bound by multiply-adds, about as long with int4 blocks as
with float32 weights (`--model smollm2-135m-instruct` is float32; a .gguf file keeps its blocks).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmlab.generate import GenerationConfig, generate
from lmlab.model.checkpoint import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a checkpoint, packaged name or GGUF file")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    args = ap.parse_args()
    gguf = str(args.model).endswith(".gguf")
    model, tok = load_pretrained(args.model, dequantize=False) if gguf else load_pretrained(args.model)
    model.eval().cfg.eos_token_id = None
    cfg = GenerationConfig(max_new_tokens=args.steps, compile=True)
    prompts = ["The king said"] * args.batch
    generate(model, tok, prompts, cfg)  # builds the graph
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        generate(model, tok, prompts, cfg)
        walls.append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"{args.model}, {args.batch} row(s): {statistics.median(walls):.2f} ms a step, wall time (median of 3)")
    with torch.profiler.profile() as prof:
        generate(model, tok, prompts, cfg)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
    print(f"{args.model}: {total:.2f} ms of profiled time per step ({args.steps} steps)")
    for e in events[: args.top]:
        print(f"  {e.self_cpu_time_total / 1e3 / args.steps:7.2f} ms  {e.key[:70]}")


if __name__ == "__main__":
    main()
