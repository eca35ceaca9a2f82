"""`make demo`: the main job on the bundled default, one stage per capability built so far.

Stage 1 (model): load SmolLM2-135M-Instruct from its GGUF file, describe it, and show what it
would say next for an English and a Chinese question.
Stage 2 (generation): it answers both questions, streamed token by token, and --explain shows
how temperature, top-k and top-p reshape its first choices (also written as a PNG).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, stream
from lmlab.generate.explain import explain, format_explanation, plot_explanation, top_next_tokens
from lmlab.model.checkpoint import load_config, load_pretrained
from lmlab.model.info import format_info, model_info

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "中国的首都是哪座城市？"]
OUT = Path("out/demo")


def _stage(title: str) -> None:
    print(f"\n== {title} ==")


def main() -> int:
    """Run every demo stage; a user-facing problem prints one line and exits 1."""
    try:
        _stage(f"lmlab model info {MODEL}")
        print(format_info(MODEL, model_info(load_config(MODEL))))

        _stage("top-5 next tokens")
        t = time.perf_counter()
        model, tokenizer = load_pretrained(MODEL)
        print(f"(loaded and dequantized in {time.perf_counter() - t:.1f}s)")
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            print(f"\n{question}")
            for token, p in top_next_tokens(model, tokenizer, prompt, k=5):
                print(f"  {p:6.1%}  {token}")

        _stage("answers, streamed (greedy, up to 64 new tokens)")
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            print(f"\nQ: {question}\nA: ", end="", flush=True)
            t, n = time.perf_counter(), 0
            for piece in stream(model, tokenizer, prompt, max_new_tokens=64):
                print(piece, end="", flush=True)
                n += 1
            print(f"\n   ({n} pieces in {time.perf_counter() - t:.1f}s)")

        _stage("lmlab generate --explain: temperature 0.7, top-k 20, top-p 0.9")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
        steps = explain(model, tokenizer, prompt, GenerationConfig(temperature=0.7, top_k=20, top_p=0.9, seed=0), k=6)
        print(format_explanation(steps))
        print(f"plot: {plot_explanation(steps, OUT / 'explain.png')}")
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
