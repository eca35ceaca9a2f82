"""speculative_generate against generate (greedy, or sampled with --temperature) on chat prompts, in one process.

The same prompts the serving benchmark's clients send ("Write a short paragraph about ..."), answered
to exactly --new-tokens tokens (EOS ignored) by the target alone and with the draft, --repeats times,
interleaved prompt by prompt; outputs checked identical; the median time of each is kept, and the
speed-up of each repeat is printed (median and range). It is the library-level
figure beside `benchmarks/serve.py --draft` (the same draft in a server).

    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft out/compress/eagle-small-int4
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --fp32-target
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --compile
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --compile --prompt-set tweets-en
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --compile --tree "0 1 00 01 000 0000"
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --tree "0 1 2 00 01 000" dynamic
    PYTHONPATH=src .venv/bin/python benchmarks/speculative_generate.py --draft PATH --temperature 0.7

With --temperature the answers are sampled (seed 0 per answer: the plain and speculative answers differ,
each distributed as the target's sampling); a dynamic tree then falls back to the chain.

Greedy rounds run two ways, interleaved with plain greedy: over a chain of up to --num-draft-tokens
drafts (cut at --confidence), and over each candidate tree of --tree (generate/draft_tree.py; by
default the one rounds check on a GPU, `speculative.default_tree`; "none" skips them), all interleaved.

With --compile both sides run compiled graphs (plain decode steps; the rounds' target check and
draft steps), compiled before timing: the figure a chat or a server gets once its compiles are done.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from lmlab.generate import GenerationConfig, generate
from lmlab.generate.draft_tree import DEFAULT_TREE, parse_tree
from lmlab.generate.speculative import DRAFT_CONFIDENCE, SpeculativeStats, load_draft, speculative_generate
from lmlab.model.checkpoint import load_pretrained

sys.path.insert(0, str(Path(__file__).parent))
from compress import chat_prompts  # held-out chat prompts
from serve import TOPICS  # the serving benchmark's prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", required=True, help="a draft checkpoint, or :N")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fp32-target", action="store_true", help="float32 weights (default: GGUF blocks kept)")
    ap.add_argument("--compile", action="store_true", help="compiled steps and rounds on both sides")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs checked identical)")
    ap.add_argument("--confidence", type=float, default=DRAFT_CONFIDENCE, help="the draft's stopping threshold")
    ap.add_argument("--prompt-set", choices=["topics", "chatterbot", "tweets-en"], default="topics",
                    help="the serving benchmark's requests, or held-out chatterbot turns or tweets")  # fmt: skip
    ap.add_argument(
        "--tree",
        nargs="+",
        default=[DEFAULT_TREE],
        help='also rounds over each of these candidate trees ("none": the chain only)',
    )
    args = ap.parse_args()
    trees = [parse_tree(t) for t in args.tree if t != "none"]
    target, tok = load_pretrained(args.model, dequantize=True if args.fp32_target else "auto")
    target.eval()
    draft = load_draft(args.draft, target)
    if args.prompt_set == "topics":
        asks = [
            f"Write a short paragraph about {t} (request {i})." for i, t in enumerate(TOPICS.split()[: args.prompts])
        ]
        prompts = [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True) for a in asks]
    else:  # held-out user turns the drafts were not trained on (benchmarks/compress.py's draft stage)
        prompts = chat_prompts(tok, args.prompts, args.prompt_set)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[], compile=args.compile,
                           temperature=args.temperature, seed=0 if args.temperature else None)  # fmt: skip
    ways = {"draft": {"num_draft_tokens": args.num_draft_tokens, "confidence": args.confidence, "tree": None}}
    for tree in trees:
        ways[str(tree)] = {**ways["draft"], "tree": tree}
    # kernels built, caches warm, and every graph the prompts' lengths need compiled before timing
    for p in prompts if args.compile else prompts[:1]:
        generate(target, tok, p, cfg)
        for spec in ways.values():
            speculative_generate(target, draft, tok, p, cfg, **spec)
    times: dict[str, list[float]] = {"greedy": [], **{w: [] for w in ways}}
    stats, identical = {w: SpeculativeStats() for w in ways}, True
    for rep in range(args.repeats):
        # prompt by prompt, one way then the other: all see the machine in the same state (its speed
        # drifts by 10-20% over tens of seconds here)
        spent = dict.fromkeys(times, 0.0)
        for p in prompts:
            t = time.perf_counter()
            want = generate(target, tok, p, cfg)[0].token_ids
            spent["greedy"] += time.perf_counter() - t
            for w, spec in ways.items():
                t = time.perf_counter()
                g, st = speculative_generate(target, draft, tok, p, cfg, **spec)
                spent[w] += time.perf_counter() - t
                identical &= g.token_ids == want
                if rep == 0:
                    for field in ("accepted", "proposed", "rounds", "generated"):
                        setattr(stats[w], field, getattr(stats[w], field) + getattr(st, field))
        for w, s in spent.items():
            times[w].append(s)
    n = len(prompts) * args.new_tokens
    how_plain = f"sampled at temperature {args.temperature}" if args.temperature else "greedy"
    same = "n/a (sampled)" if args.temperature else identical
    g = statistics.median(times["greedy"])
    weights = ("float32" if args.fp32_target else "GGUF blocks as stored") + (
        ", compiled" if args.compile else ", eager"
    )
    print(f"{args.model} ({weights}), draft {args.draft}: {len(prompts)} {args.prompt_set} prompts x "
          f"{args.new_tokens} tokens; {how_plain} {n / g:.1f} tok/s; outputs identical: {same}")  # fmt: skip
    for w in ways:
        d, st = statistics.median(times[w]), stats[w]
        how = f"tree {w} ({len(ways[w]['tree'])} candidates)" if w != "draft" else (
            f"chain (k = {args.num_draft_tokens}, confidence {args.confidence})")  # fmt: skip
        ratios = sorted(a / b for a, b in zip(times["greedy"], times[w]))
        print(f"  {how}: {n / d:.1f} tok/s, {g / d:.2f}x (per repeat: median {statistics.median(ratios):.2f}x, "
              f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x, {len(ratios)} repeats); {st.tokens_per_round:.2f} tokens "
              f"per round; drafted tokens accepted {st.accepted}/{st.proposed} ({st.acceptance_rate:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
