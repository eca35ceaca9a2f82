"""Speculative decoding's target check with and without the few-query decode attention kernel.

The check feeds k + 1 queries of one sequence; `cpu_kernels.attention` sends them to
`lmlab::decode_attention` as a batch of one-query rows. This A/B swaps in a wrapper that sends every
multi-query call to torch's SDPA instead, side by side in one process (interleaved repeats), and prints
each variant's speed relative to plain greedy decoding. Outputs must be identical.

    PYTHONPATH=src python benchmarks/speculative_attention.py --eagle out/compress/eagle3-int4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch.nn.functional as F

from compress import MODEL, chat_prompts
from lmlab.generate import GenerationConfig, cpu_kernels, generate
from lmlab.generate.speculative import speculative_generate
from lmlab.model.checkpoint import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eagle", type=Path, default=Path("out/compress/eagle3-int4"),
                   help="an EAGLE (or any) draft checkpoint (recipes/compress/eagle-smollm2.yaml, then lmlab quantize)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-set", choices=["chatterbot", "tweets-en"], default="tweets-en")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--confidence", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not args.eagle.exists():  # (make bench on a fresh checkout: the draft takes hours to train here)
        print(f"no draft at {args.eagle}: train one with recipes/compress/eagle-smollm2.yaml; skipped")
        return
    target, tok = load_pretrained(MODEL, dequantize="auto")  # as lmlab generate runs it
    draft = load_pretrained(args.eagle)[0].eval()
    prompts = chat_prompts(tok, args.prompts, args.prompt_set)
    cfg = GenerationConfig(max_new_tokens=128)
    kernel = cpu_kernels.attention

    def torch_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.dim() == 4 and q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)  # fmt: skip
        return kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def run(name: str) -> list[list[int]]:
        if name == "greedy":
            return [generate(target, tok, q, cfg)[0].token_ids for q in prompts]
        cpu_kernels.attention = torch_attention if "torch" in name else kernel
        try:
            return [speculative_generate(target, draft, tok, q, cfg, num_draft_tokens=args.k,
                                         confidence=args.confidence, tree=None)[0].token_ids for q in prompts]  # fmt: skip
        finally:
            cpu_kernels.attention = kernel

    want = run("greedy")
    times: dict[str, list[float]] = {"greedy": [], "check on the kernel": [], "check on torch's attention": []}
    for _ in range(args.repeats):
        for name in times:  # interleaved: drift hits every variant alike
            t = time.perf_counter()
            out = run(name)
            times[name].append(time.perf_counter() - t)
            assert out == want, f"{name}: output differs from plain greedy"
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in med.items():
        print(f"{name}: {v:.2f} s, {med['greedy'] / v:.3f}x plain greedy")


if __name__ == "__main__":
    main()
