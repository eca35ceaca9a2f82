"""Quantization: quality and decode speed of SmolLM2-135M-Instruct at fp32, int8, int4 (RTN, GPTQ)
and GGUF blocks, beside llama.cpp on the same GGUF files.

Quality (--ppl): perplexity on the KJV and Python-docs test splits (the first --ppl-chars characters
of each). The packaged SmolLM2 is itself a Q4_1 GGUF (the only real decoder weights that install
offline), so its "fp32" weights already sit on a 4-bit grid of groups of 32: int4 with groups of 32
and offsets would reproduce them exactly. The int4 rows therefore use groups of 128, the common
GPTQ setting, where rounding is real; the gap GPTQ closes is measured there.

Speed (--speed): tokens/s at batch 1 and 8 (128 new tokens, greedy, EOS off), eager and compiled,
and prefill of 512 tokens, with the weight bytes each step streams and GB/s; llama.cpp
(node-llama-cpp, 2 threads) on the GGUF files where the test set-up installed it. Runs are
interleaved and the median of --repeats taken (a shared machine drifts).

    .venv/bin/python benchmarks/quantize.py [--ppl] [--speed] [--ppl-chars 60000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.compress.gptq import calibration_batches
from lmlab.compress.quantize import calibration_texts, quantize_model
from lmlab.eval.harness import load_texts
from lmlab.eval.perplexity import perplexity
from lmlab.generate import GenerationConfig, generate_ids
from lmlab.generate.decode import left_pad
from lmlab.model.checkpoint import load_pretrained
from lmlab.model.quantized import QuantConfig, quantized_bytes
from lmlab.utils.packaged import packaged_path

MODEL = "smollm2-135m-instruct"


def variants(gptq_samples: int) -> dict[str, object]:
    """name -> a function returning the model (built when needed: each holds its own weights)."""

    def rtn(cfg: QuantConfig):
        def build():
            m, _ = load_pretrained(MODEL)
            quantize_model(m, cfg)
            return m

        return build

    def gptq(cfg: QuantConfig):
        def build():
            m, tok = load_pretrained(MODEL)
            texts = calibration_texts("kjv", gptq_samples * 512 * 8)
            quantize_model(m, cfg, calibration_batches(tok, texts, gptq_samples, 512))
            return m

        return build

    return {
        "fp32": lambda: load_pretrained(MODEL)[0],
        "int8 (per channel)": rtn(QuantConfig(bits=8)),
        "int4 RTN g128": rtn(QuantConfig(bits=4, group_size=128, sym=False)),
        "int4 GPTQ g128": gptq(QuantConfig(bits=4, group_size=128, sym=False, method="gptq")),
        "int4 RTN g32 sym": rtn(QuantConfig(bits=4, group_size=32, sym=True)),
        "GGUF Q4_1 as stored": lambda: load_pretrained(MODEL, dequantize=False)[0],
    }


def quality(args: argparse.Namespace) -> None:
    _, tok = load_pretrained(MODEL)
    sets = {}
    for name in ("kjv", "python-docs"):
        text, n = [], 0
        for t in load_texts(name, "test"):
            text.append(t)
            n += len(t)
            if n >= args.ppl_chars:
                break
        sets[name] = text
    print(f"perplexity, first {args.ppl_chars:,} characters of each test split, windows of 512, stride 256")
    print(f"{'model':<22}{'MB':>8}" + "".join(f"{n:>14}{'vs fp32':>9}" for n in sets))
    base = {}
    for name, build in variants(args.gptq_samples).items():
        t = time.perf_counter()
        model = build()
        made = time.perf_counter() - t
        row = f"{name:<22}{quantized_bytes(model) / 1e6:>8.0f}"
        for data, texts in sets.items():
            with torch.inference_mode():
                ppl = perplexity(model, tok, texts, max_length=512, stride=256)["perplexity"]
            base.setdefault(data, ppl)
            row += f"{ppl:>14.3f}{ppl / base[data] - 1:>+9.2%}"
        print(row + (f"   (built in {made:.0f} s)" if made > 5 else ""), flush=True)
        del model


def speed(args: argparse.Namespace) -> None:
    _, tok = load_pretrained(MODEL)
    builds = variants(args.gptq_samples)
    chosen = {n: builds[n] for n in ("fp32", "int8 (per channel)", "int4 RTN g32 sym", "GGUF Q4_1 as stored")}
    prompts = ["Write a short story about a robot.", "中国的四大发明是什么？", "List five colors.", "What is 2+2?"] * 2
    long_prompt = tok.encode(" ".join(load_texts("kjv", "test")[:200]))[:512]
    print(f"{torch.get_num_threads()} threads; {args.new_tokens} new tokens; median of {args.repeats}")
    print(f"{'model':<22}{'MB/step':>8}{'batch':>6}{'eager tok/s':>12}{'compiled tok/s':>15}{'GB/s':>7}"
          f"{'prefill 512 tok/s':>19}")  # fmt: skip
    for name, build in chosen.items():
        model = build()
        nbytes = quantized_bytes(model) - model.embed.weight.numel() * 4  # the lookup reads one row
        with torch.inference_mode():
            pre = torch.tensor([long_prompt])
            model(pre[:, :64])
            t = []
            for _ in range(args.repeats):
                s = time.perf_counter()
                model(pre, logits_to_keep=1)
                t.append(time.perf_counter() - s)
            prefill = pre.shape[1] / statistics.median(t)
            for batch in args.batches:
                rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True) for p in prompts[:batch]]  # fmt: skip
                ids, mask = left_pad(rows, tok.pad_token_id)
                res = {}
                for mode, compile_ in (("eager", False), ("compiled", True)):
                    cfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[], compile=compile_)
                    generate_ids(model, ids, mask, cfg, eos=[], pad_id=tok.pad_token_id)  # warm-up / compile
                    t = []
                    for _ in range(args.repeats):
                        s = time.perf_counter()
                        generate_ids(model, ids, mask, cfg, eos=[], pad_id=tok.pad_token_id)
                        t.append(time.perf_counter() - s)
                    res[mode] = batch * args.new_tokens / statistics.median(t)
                gbs = res["compiled"] / batch * nbytes / 1e9
                print(f"{name:<22}{nbytes / 1e6:>8.0f}{batch:>6}{res['eager']:>12.1f}{res['compiled']:>15.1f}"
                      f"{gbs:>7.1f}{prefill:>19.0f}", flush=True)  # fmt: skip
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl", action="store_true", help="perplexity table")
    ap.add_argument("--speed", action="store_true", help="decode and prefill speed table")
    ap.add_argument("--ppl-chars", type=int, default=60_000)
    ap.add_argument("--gptq-samples", type=int, default=64, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (args.ppl or args.speed):
        args.ppl = args.speed = True
    if not Path(packaged_path(MODEL)).exists():
        sys.exit("SmolLM2 is not installed: run make setup")
    if args.ppl:
        quality(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
