"""Serving throughput: aggregate generated tokens/s at 1, 4 and 16 concurrent streaming clients, and time to first token.

Starts `lmlab serve` on SmolLM2-135M-Instruct (loopback, a free port), then for each concurrency
level runs that many clients, each sending `--rounds` chat requests one after another with
`ignore_eos` so every answer is exactly `--max-tokens` long. Goal: 16 clients >= 5x the
aggregate tokens/s of 1 client (continuous batching turns one forward per client into one
forward per step for all of them).

.venv/bin/python benchmarks/serve.py                        # SmolLM2, 64 tokens, 2 rounds
.venv/bin/python benchmarks/serve.py --model PATH --max-tokens 32 --levels 1 8 32
.venv/bin/python benchmarks/serve.py --no-compile | --keep-quantized   # eager steps | GGUF blocks as stored
.venv/bin/python benchmarks/serve.py --draft out/compress/eagle-int4 --levels 1   # speculative, 1 client

With `--draft`, each level runs twice, on a server without the draft and on one with it (a lone
request decodes by speculative rounds, serve/engine.py), side by side, with the draft's acceptance
from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from lmlab.serve.metrics import parse_metrics
from lmlab.serve.server import launched

TOPICS = "rivers mountains bread music clocks bridges gardens comets trains libraries bees glass paper wind salt maps"


async def one_request(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one streamed chat request."""
    topic = TOPICS.split()[i % 16]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short paragraph about {topic} (request {i})."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), tokens, time.perf_counter() - start


async def level(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """Run `clients` concurrent clients for `rounds` requests each; aggregate tokens/s and TTFT."""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def worker(c: int) -> list[tuple[float, int, float]]:
            return [await one_request(client, model, c * rounds + k, max_tokens) for k in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


def openmp_from_threads() -> tuple[float, float]:
    """Microseconds of one parallel ATen op (an add over 1M floats) from the main thread and from a second
    thread while the main thread's idle OpenMP pool lives: why `lmlab serve` runs its scheduler in the main
    thread (libgomp stops spinning between regions once two threads keep pools: utils/threads.py)."""
    import threading

    import torch

    big, out = torch.randn(1 << 20), {}

    def run(key: str) -> None:
        for _ in range(100):
            big.add(1.0)
        t = time.perf_counter()
        for _ in range(2000):
            big.add(1.0)
        out[key] = (time.perf_counter() - t) / 2000 * 1e6

    run("main")
    thread = threading.Thread(target=run, args=("thread",))
    thread.start()
    thread.join()
    return out["main"], out["thread"]


def pending_compiles(url: str) -> float:
    """Decode graphs the server is still compiling (its /metrics)."""
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text).get("lmlab_decode_graphs_pending", 0.0)


def server_flags(args) -> list[str]:
    """`lmlab serve` flags for the batch size, compile and quantization settings asked for."""
    flags = ["--max-batch", str(max(args.levels))] + ([] if args.compile else ["--no-compile"])
    return flags + (["--keep-quantized"] if args.keep_quantized else [])


def run_levels(args, flags: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Each level once to warm up, so that each batch size's decode graph is built (in the background)
    before the measured runs, which then see what a server that has run a while gives; then each level
    measured; and the speculative counters of /metrics over the measured runs."""
    name = Path(str(args.model).rstrip("/")).name
    with launched(args.model, *flags) as url:
        for c in args.levels:  # (a draft's policy measures both ways in the first few dozen steps)
            asyncio.run(level(url, name, c, 1, 64 if "--draft" in flags else 8))
        while args.compile and pending_compiles(url):
            time.sleep(1)
        before = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        rows = [asyncio.run(level(url, name, c, args.rounds, args.max_tokens)) for c in args.levels]
        after = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    return rows, {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(("lmlab_draft", "lmlab_spec"))}


def compare_draft(args) -> int:
    """The same levels on a server without the draft and on one with it per --speculate policy."""
    flags = server_flags(args)
    plain, _ = run_levels(args, flags)
    drafted = [*flags, "--draft", args.draft, "--num-draft-tokens", str(args.num_draft_tokens)]
    runs = {mode: run_levels(args, [*drafted, "--speculate", mode]) for mode in args.speculate}
    steps = "compiled decode steps" if args.compile else "eager decode steps"
    steps += ", GGUF blocks kept" if args.keep_quantized else ""
    print(f"lmlab serve {args.model} ({steps}), {args.max_tokens} tokens per request, {args.rounds} rounds per client")
    print(f"draft {args.draft}, up to {args.num_draft_tokens} tokens a round")
    print(f"{'clients':>8} {'plain tok/s':>12} " + " ".join(f"{'--speculate ' + m:>18} {'speedup':>8}" for m in runs))
    for i, a in enumerate(plain):
        line = f"{a['clients']:>8} {a['tokens_per_s']:>12.1f} "
        for rows, _ in runs.values():
            line += f"{rows[i]['tokens_per_s']:>18.1f} {rows[i]['tokens_per_s'] / a['tokens_per_s']:>7.2f}x "
        print(line)
    for mode, (_, m) in runs.items():
        proposed, accepted = (
            m.get("lmlab_draft_tokens_proposed_total", 0),
            m.get("lmlab_draft_tokens_accepted_total", 0),
        )
        rounds = m.get("lmlab_speculative_rounds_total", 0)
        print(f"--speculate {mode}: {rounds:.0f} speculative rounds, {accepted:.0f}/{proposed:.0f} drafted tokens "
              f"accepted ({accepted / max(proposed, 1):.0%})")  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="the server's eager decode steps")
    ap.add_argument("--keep-quantized", action="store_true", help="serve a GGUF file's blocks as stored")
    ap.add_argument("--draft", default=None, help="also serve with this draft (lmlab serve --draft) and compare")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--speculate", nargs="+", choices=["auto", "always"], default=["auto", "always"],
                    help="with --draft: the server policies to run, a server each")  # fmt: skip
    args = ap.parse_args()
    if args.draft:
        return compare_draft(args)
    rows, _ = run_levels(args, server_flags(args))
    steps = "compiled decode steps" if args.compile else "eager decode steps (--no-compile)"
    steps += ", GGUF blocks kept (--keep-quantized)" if args.keep_quantized else ""
    print(f"lmlab serve {args.model}: {args.max_tokens} tokens per request, {args.rounds} rounds per client, {steps}")
    print(
        f"{'clients':>8} {'requests':>9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'speedup':>8} {'TTFT p50':>9} {'TTFT p95':>9}"
    )
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(
            f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['tokens_per_s'] / base:>7.1f}x {r['ttft_p50']:>8.3f}s {r['ttft_p95']:>8.3f}s"
        )
    main_us, thread_us = openmp_from_threads()
    print(f"an OpenMP-parallel op: {main_us:.0f} us from the main thread, {thread_us:.0f} us from a second one")
    top = rows[-1]
    verdict = "meets" if top["tokens_per_s"] >= 5 * base else "misses"
    print(
        f"{top['clients']} clients reach {top['tokens_per_s'] / base:.1f}x the throughput of 1: {verdict} the 5x goal"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
