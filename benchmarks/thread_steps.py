"""The same compiled decode step called from the main thread and from a second Python thread, in one process.

A server's scheduler and an `Engine` driven from a script run their steps in a thread of their own. A
step runs a few hundred small parallel regions, so how fast OpenMP's workers wake for each one counts;
run it with OMP_WAIT_POLICY=PASSIVE (or ACTIVE) set beside the default to see how much. The last row
hands the main thread's idle OpenMP workers back first (`utils/threads.py`), as `Engine.start()` does.

    PYTHONPATH=src .venv/bin/python benchmarks/thread_steps.py [--fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from lmlab.generate import decode
from lmlab.generate.kv_cache import StaticKVCache
from lmlab.model.checkpoint import load_pretrained
from lmlab.utils.threads import release_openmp_pool


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--fp32", action="store_true", help="float32 weights (default: GGUF blocks as stored)")
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    model, _ = load_pretrained(args.model, dequantize=True if args.fp32 else "auto")
    model.eval()
    capacity = 256
    warm = decode.warmup(model, 1, capacity, torch.device("cpu"))  # compiled in a thread of its own
    warm.ready.wait()
    out: dict[str, float] = {}

    def steps(name: str) -> None:
        with torch.inference_mode():
            cache = StaticKVCache.for_model(model, 1, capacity)
            mask = torch.ones(1, capacity, dtype=torch.long)
            times = []
            for _ in range(args.calls):
                cache.length = 50
                cache.advance(1)
                t = time.perf_counter()
                warm.forward(torch.tensor([[5]]), attention_mask=mask, kv_cache=cache, logits_to_keep=1)
                times.append(time.perf_counter() - t)
            out[name] = statistics.median(times[3:])

    steps("main thread")
    thread = threading.Thread(target=steps, args=("second thread",))
    thread.start()
    thread.join()
    steps("main thread again")
    # the main thread's idle OpenMP workers handed back first, as Engine.start() does (utils/threads.py)
    released = release_openmp_pool()
    thread = threading.Thread(target=steps, args=(f"second, released {'yes' if released else 'NO'}",))
    thread.start()
    thread.join()
    base = min(out["main thread"], out["main thread again"])
    for name, s in out.items():
        print(f"{name:<22} {s * 1e3:6.2f} ms a step  {s / base:.2f}x the main thread's faster run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
