"""What a speculative round costs against a plain step: the target's check of k + 1 tokens and the draft's
one-token step, compiled and eager, beside the compiled one-token decode step, in one process.

A round pays when its tokens (accepted drafts + 1) outnumber its cost in plain steps. Where a step is
bound by reading the weights (float32 on a CPU; a GPU), checking 5 tokens costs about one step; where
it is bound by arithmetic (4-bit blocks turned into floats on 2 CPU cores), it costs several, and no
weak draft can pay for that. The ratios printed say which case a machine is in.

    PYTHONPATH=src .venv/bin/python benchmarks/speculative_check.py --draft out/compress/eagle-small-int4
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_check.py --keep-quantized
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lmlab.generate import cpu_kernels, decode
from lmlab.generate.kv_cache import StaticKVCache
from lmlab.generate.speculative import load_draft
from lmlab.model.checkpoint import load_pretrained


def timed(fn, n: int) -> float:
    """Median seconds of `n` calls, after 3 unmeasured ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def costs(model, width: int, capacity: int, past: int, n: int) -> dict[str, float]:
    """Seconds of: the compiled decode step, and `width` tokens compiled and eager, after `past` cached."""
    cache = StaticKVCache.for_model(model, 1, capacity)
    mask = torch.zeros(1, capacity, dtype=torch.long)
    mask[:, : past + width] = 1
    ids = torch.randint(0, 1000, (1, width))
    extra = decode.rows_features(model, width)
    rows = decode.compiled(model, 1, capacity, width=width)

    def call(fn, T: int, **kw):
        def run():
            cache.length = past
            cache.advance(T)
            return fn(ids[:, :T], attention_mask=mask, kv_cache=cache, **kw)

        return run

    def eager():
        with cpu_kernels.for_rows(width):
            return call(lambda *a, **k: decode._rows_forward_plain(model, *a, **k), width, **extra)()

    label = f"{width} token{'s' if width > 1 else ''}"
    out = {f"{label}, compiled": timed(call(rows, width, **extra), n), f"{label}, eager": timed(eager, n)}
    if not model.cfg.eagle:
        step = decode.compiled(model, 1, capacity)
        out["1 token, compiled step"] = timed(call(step, 1, logits_to_keep=1), n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default=None, help="also time this draft's one-token step")
    ap.add_argument("--keep-quantized", action="store_true", help="GGUF blocks as stored (default: float32)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--past", type=int, default=100, help="tokens already cached")
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    target, _ = load_pretrained(args.model, dequantize="auto" if args.keep_quantized else True)
    target.eval()
    capacity = decode.capacity_for(args.past + args.num_draft_tokens + 1)
    k1 = args.num_draft_tokens + 1
    weights = "GGUF blocks as stored" if args.keep_quantized else "float32"
    print(f"{args.model} ({weights}), {args.past} tokens cached, {torch.get_num_threads()} threads; compiling...")
    t = costs(target, k1, capacity, args.past, args.calls)
    step = t["1 token, compiled step"]
    for name, s in t.items():
        print(f"  target, {name:<24} {s * 1e3:7.2f} ms  {s / step:5.2f} steps")
    if args.draft:
        d = costs(load_draft(args.draft, target), 1, capacity, args.past, args.calls)
        for name, s in d.items():
            print(f"  draft,  {name:<24} {s * 1e3:7.2f} ms  {s / step:5.2f} steps")
        # a round: the check, the draft's catch-up and k - 1 more steps (catch-up taken as one step here)
        round_ = t[f"{k1} tokens, compiled"] + args.num_draft_tokens * d["1 token, compiled"]
        print(f"  a compiled round of {args.num_draft_tokens} drafts costs ~{round_ / step:.2f} plain steps: it pays "
              f"when more tokens than that come out of it (accepted drafts + 1)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
