"""A chat of several turns with and without compiling the next answer's graphs while the user types
(`ChatSession.precompile`, which `lmlab chat` calls before it reads a question), each way in a fresh
process, one after the other.

With 128 new tokens an answer's graphs cover 256, 512, then 1,024 columns (`decode.capacity_for`), so
a conversation outgrows them every few answers; the answer that crosses runs eagerly while its graph
compiles on the same cores, unless it was compiled in the pause before it. `--think` seconds pass
before each question (a user reading and typing); an answer's time runs from its question to its
last piece. Run it twice to see the noise; the first run after a change also fills inductor's disk
cache, which makes later compiles faster.

    PYTHONPATH=src .venv/bin/python benchmarks/chat_widths.py [--think 10] [--draft PATH] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

QUESTIONS = [
    "What is a transformer in machine learning?",
    "How does attention work in it?",
    "Why do language models need a KV cache?",
    "What is speculative decoding?",
    "Give me one tip for writing clear code.",
    "Summarise our conversation in two sentences.",
]


def child(args: argparse.Namespace) -> None:
    from lmlab.generate import GenerationConfig, decode
    from lmlab.generate.chat import ChatSession
    from lmlab.generate.speculative import load_draft
    from lmlab.model.checkpoint import load_pretrained

    model, tok = load_pretrained(args.model, dequantize="auto")  # as `lmlab chat` loads it
    draft = load_draft(args.draft, model) if args.draft else None
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, compile="auto")
    session = ChatSession(model, tok, cfg, draft=draft)
    for q in QUESTIONS:
        if args.child == "ahead":
            session.precompile()
        time.sleep(args.think)
        width = decode.capacity_for(len(tok.encode(session.prompt([*session.messages, {"role": "user", "content": q}])))
                                    + cfg.max_new_tokens)  # fmt: skip
        t = time.perf_counter()
        answer = "".join(session.reply(q))
        seconds = time.perf_counter() - t
        tokens = len(tok.encode(answer, add_special_tokens=False))
        print(json.dumps({"width": width, "seconds": seconds, "tokens": tokens}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default=None, help="a draft for speculative answers (chat's --draft)")
    ap.add_argument("--think", type=float, default=10.0, help="seconds before each question")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", choices=["ahead", "on-demand"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    runs: dict[str, list[list[dict]]] = {"on-demand": [], "ahead": []}
    for _ in range(args.repeats):
        for way in runs:
            cmd = [sys.executable, __file__, "--child", way, "--model", args.model, "--think", str(args.think),
                   "--new-tokens", str(args.new_tokens)] + (["--draft", args.draft] if args.draft else [])  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[way].append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    print(f"{args.model}, {args.new_tokens} new tokens, {args.think:g} s before each question; tok/s per answer")
    print(f"{'answer':>6} {'width':>6}  {'compiled when needed':>22}  {'compiled ahead':>16}")
    for i in range(len(QUESTIONS)):
        cells = [" ".join(f"{r[i]['tokens'] / r[i]['seconds']:6.1f}" for r in runs[w]) for w in runs]
        print(f"{i + 1:>6} {runs['ahead'][0][i]['width']:>6}  {cells[0]:>22}  {cells[1]:>16}")
    for r_demand, r_ahead in zip(runs["on-demand"], runs["ahead"]):
        a = sum(x["seconds"] for x in r_demand)
        b = sum(x["seconds"] for x in r_ahead)
        print(f"answer time in all: compiled when needed {a:.1f} s, ahead {b:.1f} s: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
