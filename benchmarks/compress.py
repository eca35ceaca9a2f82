"""Pruning and distillation on SmolLM2-135M-Instruct, measured side by side in one script.

Stages (each writes into OUT/results.json, so they can run one at a time on a busy machine):

  ppl         perplexity on a held-out KJV slice (test split): dense, then one-shot magnitude and
              Wanda at several sparsities and 2:4 (the sparsity/perplexity curve -> OUT/sparsity_ppl.png)
  structured  remove 1 of 3 KV groups per layer and MLP neurons to ~25% fewer parameters (activation
              importance on KJV train windows); perplexity before and after a short recovery run
              (recipes/compress/recover-smollm2.yaml), and greedy decode speed against the dense model
  draft       distil the first layers of SmolLM2 into a draft (recipes/compress/distill-smollm2-draft.yaml),
              then on held-out chat prompts: acceptance rate and greedy speed of speculative decoding with
              the undistilled and the distilled draft against plain greedy, outputs checked identical

    PYTHONPATH=src .venv/bin/python benchmarks/compress.py --stage all [--out out/bench-compress]

Timings on a shared CPU are noisy: runs are interleaved and the median is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmlab.compress import magnitude, structured, wanda
from lmlab.compress.prune import calibration_batches
from lmlab.compress.sparsity import apply_masks, sparsity_report
from lmlab.data import fetch
from lmlab.eval.perplexity import perplexity
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.speculative import speculative_generate, truncated_draft
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.utils.atomic import write_json

MODEL = "smollm2-135m-instruct"


def load_results(out: Path) -> dict:
    f = out / "results.json"
    return json.loads(f.read_text()) if f.exists() else {}


def save_results(out: Path, results: dict) -> None:
    write_json(out / "results.json", results)


def kjv_text(max_chars: int) -> list[str]:
    """The first documents of KJV's test split, up to max_chars characters (a modest, fixed slice)."""
    texts, n = [], 0
    for line in (Path(fetch("kjv")) / "test.jsonl").read_text(encoding="utf-8").splitlines():
        t = json.loads(line)["text"]
        texts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return texts


def ppl(model, tokenizer, texts: list[str], window: int) -> float:
    return round(perplexity(model, tokenizer, texts, max_length=window, stride=window)["perplexity"], 3)


def stage_ppl(args, results: dict) -> None:
    texts = kjv_text(args.eval_chars)
    model, tok = load_pretrained(MODEL)
    calib = calibration_batches(tok, "kjv", args.calib_samples, args.calib_len)
    dense = ppl(model.eval(), tok, texts, args.window)
    print(f"dense: {dense}", flush=True)
    rows = {"dense": dense, "tokens": len(tok.encode("\n\n".join(texts)))}
    curves: dict[str, list] = {"magnitude": [], "wanda": []}
    for s in args.sparsities:
        for method in ("magnitude", "wanda"):
            m, _ = load_pretrained(MODEL)
            t0 = time.perf_counter()
            if method == "magnitude":
                apply_masks(m, magnitude.magnitude_masks(m, s, "layer"))
            else:
                wanda.wanda_masks(m, calib, s)
            dt = time.perf_counter() - t0
            p = ppl(m.eval(), tok, texts, args.window)
            curves[method].append((s, p))
            print(f"{method} {s:.0%}: ppl {p} (pruning {dt:.1f} s)", flush=True)
    for method in ("magnitude", "wanda"):
        m, _ = load_pretrained(MODEL)
        if method == "magnitude":
            apply_masks(m, magnitude.magnitude_masks(m, 0.0, pattern="2:4"))
        else:
            wanda.wanda_masks(m, calib, 0.0, pattern="2:4")
        rows[f"{method} 2:4"] = ppl(m.eval(), tok, texts, args.window)
        rows[f"{method} 2:4 sparsity"] = sparsity_report(m)["sparsity"]
        print(f"{method} 2:4: ppl {rows[f'{method} 2:4']}", flush=True)
    rows["curves"] = curves
    results["ppl"] = rows
    from lmlab.viz.sparsity import plot_sparsity_curve

    plot_sparsity_curve(curves, args.out / "sparsity_ppl.png", dense,
                        f"SmolLM2-135M-Instruct, KJV test ({rows['tokens']} tokens)")  # fmt: skip


def decode_speed(
    pairs: list[tuple[str, object]], tok, prompts: list[str], new_tokens: int, repeats: int, compile: bool = False
) -> dict:
    """Median greedy decode time per model, runs interleaved (EOS off so every run does every step).
    compile=True: the compiled decode graph `lmlab generate` switches to once it is built (built
    here first, outside the clock)."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, compile=compile)
    for _, m in pairs:
        m.cfg.eos_token_id = None
        if compile:
            generate(m, tok, prompts[0], cfg)
    times: dict[str, list[float]] = {name: [] for name, _ in pairs}
    for _ in range(repeats):
        for name, m in pairs:
            t = time.perf_counter()
            for p in prompts:
                generate(m, tok, p, cfg)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def stage_structured(args, results: dict) -> None:
    from lmlab.finetune.run import finetune
    from lmlab.train.config import load_recipe

    texts = kjv_text(args.eval_chars)
    model, tok = load_pretrained(MODEL)
    calib = calibration_batches(tok, "kjv", args.calib_samples, args.calib_len)
    t0 = time.perf_counter()
    small, info = structured.prune_structured(model, calib, args.head_sparsity, args.neuron_sparsity, "activation")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path = args.out / "structured"
    save_pretrained(small, tok, path)
    row = {k: info[k] for k in ("parameters_before", "parameters_after", "removed_fraction", "seconds")}
    row["dense_ppl"] = results.get("ppl", {}).get("dense") or ppl(model.eval(), tok, texts, args.window)
    row["pruned_ppl"] = ppl(small.eval(), tok, texts, args.window)
    print(f"structured: {row}", flush=True)
    recipe = load_recipe("recipes/compress/recover-smollm2.yaml",
                         [f"model.init_from={path}", f"train.out_dir={args.out / 'recover'}",
                          f"train.max_steps={args.recover_steps}"])  # fmt: skip
    t0 = time.perf_counter()
    finetune(recipe, progress=True)
    row["recover_seconds"] = round(time.perf_counter() - t0, 1)
    row["recover_steps"] = args.recover_steps
    recovered, _ = load_pretrained(args.out / "recover" / "final")
    row["recovered_ppl"] = ppl(recovered.eval(), tok, texts, args.window)
    prompts = ["The king said", "In the beginning", "def fibonacci(n):"]
    pair = [("dense", model), ("pruned", recovered)]
    for path, compile in (("compiled", True), ("eager", False)):  # compiled: what `lmlab generate` runs warm
        speed = decode_speed(pair, tok, prompts, args.new_tokens, args.repeats, compile)
        row[f"decode_seconds_{path}"] = speed
        row[f"decode_speedup_{path}"] = round(speed["dense"] / speed["pruned"], 3)
    print(f"structured: {row}", flush=True)
    results["structured"] = row


def chat_prompts(tok, n: int) -> list[list[int]]:
    """Held-out prompts: user turns of chatterbot's test split (English), in the chat template."""
    out = []
    for line in (Path(fetch("chatterbot")) / "test.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["lang"] == "en" and len(r["messages"][0]["content"]) > 12:
            msgs = [{"role": "user", "content": r["messages"][0]["content"]}]
            out.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        if len(out) == n:
            break
    return out


def stage_draft(args, results: dict) -> None:
    from lmlab.compress.distill import distill
    from lmlab.train.config import load_recipe

    recipe = load_recipe("recipes/compress/distill-smollm2-draft.yaml",
                         [f"train.out_dir={args.out / 'draft'}", f"train.max_steps={args.distill_steps}",
                          f"distill.student.layers={args.draft_layers}"])  # fmt: skip
    t0 = time.perf_counter()
    summary = distill(recipe)
    row = {"distill_seconds": round(time.perf_counter() - t0, 1), "distill_steps": summary["steps"],
           "val_before": summary["val_before"], "val_after": summary["val_after"],
           "draft_parameters": summary["student_parameters"], "layers": args.draft_layers}  # fmt: skip
    print(f"distill: {row}", flush=True)
    target, tok = load_pretrained(MODEL)
    target.eval()
    distilled, _ = load_pretrained(args.out / "draft" / "final")
    drafts = {"truncated (not distilled)": truncated_draft(target, args.draft_layers), "distilled": distilled.eval()}
    prompts = chat_prompts(tok, args.prompts)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    target.cfg.eos_token_id = None  # every run does every step
    times: dict[str, list[float]] = {"greedy": [], **{k: [] for k in drafts}}
    stats: dict[str, list] = {k: [0, 0, 0] for k in drafts}
    identical = True
    for rep in range(args.repeats):
        t = time.perf_counter()
        want = [generate(target, tok, p, cfg)[0].token_ids for p in prompts]
        times["greedy"].append(time.perf_counter() - t)
        for name, d in drafts.items():
            d.cfg.eos_token_id = None
            t = time.perf_counter()
            for p, w in zip(prompts, want):
                g, st = speculative_generate(target, d, tok, p, cfg, num_draft_tokens=args.k)
                identical &= g.token_ids == w
                if rep == 0:
                    stats[name][0] += st.accepted
                    stats[name][1] += st.proposed
                    stats[name][2] += st.rounds
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row["k"] = args.k
    row["prompts"] = len(prompts)
    row["new_tokens"] = args.new_tokens
    row["identical_to_greedy"] = identical
    row["seconds"] = med
    for name, (acc, prop, rounds) in stats.items():
        row[name] = {"acceptance": round(acc / max(prop, 1), 3),
                     "tokens_per_target_forward": round(len(prompts) * args.new_tokens / max(rounds, 1), 3),
                     "speedup": round(med["greedy"] / med[name], 3)}  # fmt: skip
    print(f"draft: {row}", flush=True)
    results["draft"] = row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["ppl", "structured", "draft", "all"], default="all")
    p.add_argument("--out", type=Path, default=Path("out/bench-compress"))
    p.add_argument("--eval-chars", type=int, default=16000, help="KJV test characters scored")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    p.add_argument("--head-sparsity", type=float, default=0.34, help="fraction of KV groups (1 of 3)")
    p.add_argument("--neuron-sparsity", type=float, default=0.31, help="with 1 of 3 groups: ~25%% of parameters")
    p.add_argument("--recover-steps", type=int, default=30)
    p.add_argument("--distill-steps", type=int, default=80)
    p.add_argument("--draft-layers", type=int, default=4)
    p.add_argument("--k", type=int, default=3, help="drafted tokens per round")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stages = ["ppl", "structured", "draft"] if args.stage == "all" else [args.stage]
    for stage in stages:
        results = load_results(args.out)
        t = time.perf_counter()
        {"ppl": stage_ppl, "structured": stage_structured, "draft": stage_draft}[stage](args, results)
        results.setdefault("seconds", {})[stage] = round(time.perf_counter() - t, 1)
        save_results(args.out, results)
    print(json.dumps(load_results(args.out), indent=1))


if __name__ == "__main__":
    main()
