"""The decode kernels (generate/cpu_kernels.py) against torch's own, on SmolLM2-135M-Instruct.

- matmuls: all 211 weight matmuls of one decode step (the model's own weights), at 1 and 8 rows,
  `lmlab::skinny_linear` vs `F.linear` (MKL), with the weight bytes read per millisecond;
- attention: one decode step's 30 attention calls (9 query heads over 3 key/value heads, 192
  slots of which 64 written), `lmlab::decode_attention` vs `F.scaled_dot_product_attention`;
- beam search (4 beams) and speculative decoding (a 10-layer draft), eager, kernels on vs off.

Each pair runs interleaved in this process and the best of `--repeats` is kept.

    .venv/bin/python benchmarks/decode_kernels.py [--repeats 5] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

import lmlab
from lmlab.generate import GenerationConfig, cpu_kernels
from lmlab.generate.beam import beam_search
from lmlab.generate.speculative import speculative_generate, truncated_draft
from lmlab.utils.packaged import packaged_path


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    if not cpu_kernels.available():
        print("the decode kernels do not run on this machine (they need x86 AVX-512 and a C++ compiler)")
        return
    model, tok = lmlab.load_pretrained(packaged_path("smollm2-135m-instruct"))
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mb = sum(w.numel() * 4 for w in weights) / 1e6
    print(f"SmolLM2-135M fp32: {len(weights)} weight matmuls per step, {mb:.0f} MB; {torch.get_num_threads()} threads")
    print(f"{'':<34}{'torch ms':>10}{'lmlab ms':>10}{'speed-up':>10}{'lmlab GB/s':>12}")

    def matmuls(linear, xs):
        return [linear(xs[w.shape[1]], w) for w in weights]

    def attentions(attend, q, k, v, keep):
        return [attend(q, k, v, keep, enable_gqa=True) for _ in range(cfg.n_layer)]

    cfg = model.cfg
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    with torch.inference_mode():
        for rows in (1, 8):
            xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
            ref = best_ms(partial(matmuls, F.linear, xs), args.repeats)
            ours = best_ms(partial(matmuls, lambda x, w: torch.ops.lmlab.skinny_linear(x, w, None), xs), args.repeats)
            print(f"{f'matmuls, {rows} row(s)':<34}{ref:>10.1f}{ours:>10.1f}{ref / ours:>9.2f}x{mb / ours:>12.1f}")
        for batch in (1, 8):
            qkv = torch.randn(batch, H, 1, D), torch.randn(batch, Hkv, 192, D), torch.randn(batch, Hkv, 192, D)
            keep = torch.zeros(batch, 1, 1, 192, dtype=torch.bool)
            keep[..., :64] = True
            ref = best_ms(partial(attentions, F.scaled_dot_product_attention, *qkv, keep), args.repeats)
            ours = best_ms(partial(attentions, cpu_kernels.attention, *qkv, keep), args.repeats)
            print(f"{f'attention x{cfg.n_layer}, batch {batch}':<34}{ref:>10.2f}{ours:>10.2f}{ref / ours:>9.2f}x")

        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Write a short story about a robot."}],
            add_generation_prompt=True,
            tokenize=True,
        )
        ids = torch.tensor([prompt])
        config = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[])
        draft = truncated_draft(model, 10)
        runs = {
            f"beam search (4), {args.new_tokens} tokens": lambda: beam_search(
                model, ids, torch.ones_like(ids), config.replace(num_beams=4), eos=[], pad_id=0
            ),
            f"speculative (draft 10), {args.new_tokens} tok": lambda: speculative_generate(
                model, draft, None, prompt, config
            ),
        }
        for name, run in runs.items():
            times = {}
            for _ in range(max(1, args.repeats // 2)):  # on and off interleaved
                for on in (False, True):
                    cpu_kernels.enabled = on
                    times[on] = min(times.get(on, float("inf")), best_ms(run, 1))
            cpu_kernels.enabled = True
            print(f"{name:<34}{times[False]:>10.0f}{times[True]:>10.0f}{times[False] / times[True]:>9.2f}x")


if __name__ == "__main__":
    main()
