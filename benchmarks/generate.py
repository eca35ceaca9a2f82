"""Decode speed: lmlab vs transformers `generate` on SmolLM2-135M-Instruct (same weights, greedy).

Batch 1 and 8, 128 new tokens each (EOS disabled so both do all the steps), runs interleaved and
the median compared; lmlab eager and with `compile=True` (static KV cache, one compiled graph per
step; compilation happens in the untimed warm-up). Both use the decode kernels (docs/generate.md:
eager from batch 2, compiled always) where this CPU has them; LMLAB_DECODE_KERNELS=0 measures
without. Beside them the weight-streaming bound: every
step must read all weights once, so steps/s <= memory bandwidth / weight bytes (bandwidth measured
here before every round of runs, the median taken: it drifts on a shared machine).

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import transformers

import lmlab
from lmlab.generate import GenerationConfig, generate_ids
from lmlab.generate.decode import left_pad
from lmlab.utils.packaged import packaged_path


def bandwidth_gbs(x: torch.Tensor, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few full passes over a large tensor (allocated once, at
    start, like the weights: a buffer allocated later, in fragmented memory, may read slower)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()

    path = packaged_path("smollm2-135m-instruct")
    ours, tok = lmlab.load_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs.eval().generation_config.eos_token_id = None
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    probe = torch.ones(1024 * 1024 * 1024 // 4)  # 1 GB, twice the weights: no cache holds it
    print(
        f"SmolLM2-135M fp32, {weight_bytes / 1e6:.0f} MB of weights, {torch.get_num_threads()} threads; "
        "bandwidth is sampled before every round of runs (it drifts on a shared machine)"
    )
    print(
        f"{'batch':>5}{'mode':>10}{'lmlab tok/s':>13}{'hf tok/s':>10}{'ratio':>8}{'GB/s':>7}{'bound tok/s':>13}"
        f"{'% of bound':>12}{'same ids':>10}"
    )
    prompts = ["Write a short story about a robot.", "中国的四大发明是什么？", "List five colors.", "What is 2+2?"] * 2
    base = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[])
    for batch in args.batches:
        rows = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts[:batch]
        ]
        ids, mask = left_pad(rows, tok.pad_token_id)
        kwargs = dict(
            attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        compiled = base.replace(compile=True)
        runs = {
            "eager": partial(generate_ids, ours, ids, mask, base, eos=[], pad_id=tok.pad_token_id),
            "compiled": partial(generate_ids, ours, ids, mask, compiled, eos=[], pad_id=tok.pad_token_id),
            "hf": partial(theirs.generate, ids, **kwargs),
        }
        times, bandwidths = {name: [] for name in runs}, []
        with torch.inference_mode():
            out = {name: run() for name, run in runs.items()}  # warm-up (and compilation), and the ids
            for _ in range(args.repeats):
                bandwidths.append(bandwidth_gbs(probe))
                for name, run in runs.items():
                    t = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t)
        speed = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
        bw = statistics.median(bandwidths)
        bound = bw * 1e9 / weight_bytes  # steps/s if each step did nothing but read every weight once
        for mode in ("eager", "compiled"):
            x, y = speed[mode], speed["hf"]
            same = out[mode].tolist() == out["hf"].tolist()
            print(
                f"{batch:>5}{mode:>10}{x:>13.1f}{y:>10.1f}{x / y:>7.2f}x{bw:>7.1f}{bound * batch:>13.0f}"
                f"{x / batch / bound:>11.0%}{'yes' if same else 'NO':>10}"
            )


if __name__ == "__main__":
    main()
