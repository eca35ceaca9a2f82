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


def chat_prompts(tok, n: int, source: str = "chatterbot") -> list[list[int]]:
    """Held-out prompts in the chat template: English user turns of chatterbot's test split that its
    train split (where the draft's training prompts come from) does not have, or ("tweets-en") tweets
    of tweets-en's test split that its train split does not have, as user turns."""
    from lmlab.compress.draft import user_turn

    root = Path(fetch(source))
    seen = {user_turn(json.loads(line)) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()}
    out, used = [], set()
    for line in (root / "test.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        text = user_turn(r)
        if r.get("lang", "en") == "en" and text and len(text) > 12 and text not in seen and text not in used:
            used.add(text)
            out.append(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True))  # fmt: skip
        if len(out) == n:
            break
    return out


def step_ms(model, rows: int = 1, n: int = 30) -> float:
    """Median wall time of one cached decode forward of `rows` tokens (the speculative loop's unit)."""
    from lmlab.generate import cpu_kernels
    from lmlab.generate.kv_cache import KVCache

    cache = KVCache.for_model(model, 1, 256)
    ids = torch.randint(0, 1000, (1, rows))
    d = model.cfg.d_model
    feats = {"features": torch.randn(1, rows, d)} if model.cfg.eagle else {}  # an EAGLE draft's other input
    times = []
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 64)), kv_cache=cache, **({"features": torch.randn(1, 64, d)} if feats else {}))
        for _ in range(n):
            t = time.perf_counter()
            with cpu_kernels.for_rows(rows, "cpu"):
                model(ids, kv_cache=cache, **feats)
            times.append(time.perf_counter() - t)
            cache.length -= rows
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def eagle_agreement(target, draft, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, float]:
    """Teacher-forced on the target's own greedy answers: how often an EAGLE draft's first guess is the
    target's next token, reading the target's true states ("first") and, as from its second drafted
    token on, its own predicted states ("unrolled")."""
    hits, n = [0, 0], 0
    for p, a in zip(prompts, answers):
        ids = torch.tensor([list(p) + list(a)])
        f = target.hidden_states(ids)  # (1, T, d)
        want = target.lm_head(f).argmax(-1)[0]  # the target's next token after each position
        head = torch.tensor(draft.cfg.head_tokens) if draft.cfg.head_tokens else None
        h = draft.hidden_states(ids[:, 1:], features=f[:, :-1])  # position i reads (f_i, x_{i+1})
        h2 = draft.hidden_states(ids[:, 1:], features=torch.cat([f[:, :1], h[:, :-1]], 1))
        for j, states in enumerate((h, h2)):
            guess = draft.lm_head(states).argmax(-1)[0]
            guess = head[guess] if head is not None else guess
            # answer positions: the guess made at i is for the token after i + 1
            hits[j] += int((guess[len(p) - 1 :] == want[len(p) :]).sum())
        n += len(a)
    return {"first": round(hits[0] / max(n, 1), 3), "unrolled": round(hits[1] / max(n, 1), 3)}


def stage_draft(args, results: dict) -> None:
    from lmlab.compress.distill import distill
    from lmlab.train.config import load_recipe

    row: dict = {}
    if args.draft is None:  # distil one (recipes/compress/distill-smollm2-draft.yaml)
        overrides = [f"train.out_dir={args.out / 'draft'}"]
        overrides += [f"train.max_steps={args.distill_steps}"] if args.distill_steps else []
        overrides += [f"distill.student.layers={args.draft_layers}"] if args.draft_layers else []
        recipe = load_recipe("recipes/compress/distill-smollm2-draft.yaml", overrides)
        t0 = time.perf_counter()
        summary = distill(recipe)
        row = {"distill_seconds": round(time.perf_counter() - t0, 1), "distill_steps": summary["steps"],
               "val_before": summary["val_before"], "val_after": summary["val_after"],
               "train_windows": summary["train_windows"], "draft_parameters": summary["student_parameters"]}  # fmt: skip
        print(f"distill: {row}", flush=True)
        args.draft = args.out / "draft" / "final"
    # as `lmlab generate` loads it: the packaged GGUF's Q4_1 blocks run quantized where the kernels do
    target, tok = load_pretrained(MODEL, dequantize="auto" if args.quantized_target else True)
    target.eval()
    row["target"] = "Q4_1 blocks (lmlab generate's default)" if args.quantized_target else "float32"
    distilled, _ = load_pretrained(args.draft)
    distilled.eval()
    layers = distilled.cfg.n_layer
    drafts = {f"first {layers} layers, not distilled": truncated_draft(target, layers), "distilled": distilled}
    row.update(draft=str(args.draft), draft_layers=layers,
               draft_head_tokens=len(distilled.cfg.head_tokens or []) or distilled.cfg.vocab_size)  # fmt: skip
    # drafts that read the target's hidden states (recipes/compress/eagle-smollm2.yaml), named by folder
    eagles = {f"EAGLE {path.parent.name if path.name == 'final' else path.name}": path for path in args.eagle}
    for name, path in eagles.items():
        drafts[name] = load_pretrained(path)[0].eval()
    row["eagle"] = [str(path) for path in args.eagle]
    # what a round costs: k one-token draft steps and one (k + 1)-token target step
    row["step_ms"] = {"target": round(step_ms(target), 2), f"target {args.k[0] + 1} rows": round(step_ms(target, args.k[0] + 1), 2),
                      **{name: round(step_ms(d), 2) for name, d in drafts.items()}}  # fmt: skip
    print(f"step ms: {row['step_ms']}", flush=True)
    prompts = chat_prompts(tok, args.prompts, args.prompt_set)
    row["prompt_set"] = args.prompt_set
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    runs: dict = {"greedy": None, f"{next(iter(drafts))}, k={args.k[0]}": (drafts[next(iter(drafts))], args.k[0], 0.0)}
    runs.update({f"distilled, k={k}, confidence={c}": (distilled, k, c) for k in args.k for c in args.confidence})
    for e in eagles:
        runs.update({f"{e}, k={k}, confidence={c}": (drafts[e], k, c) for k in args.k for c in args.confidence})
    times: dict[str, list[float]] = {name: [] for name in runs}
    stats: dict[str, list[int]] = {name: [0, 0, 0] for name in runs}
    want: list[list[int]] = []  # greedy's tokens per prompt (it runs first in every repeat)
    identical = True
    for rep in range(args.repeats):
        for name, run in runs.items():  # interleaved: the machine's drift hits every variant alike
            t = time.perf_counter()
            for i, p in enumerate(prompts):
                if run is None:
                    ids = generate(target, tok, p, cfg)[0].token_ids
                    if rep == 0:
                        want.append(ids)
                    identical &= ids == want[i]
                    continue
                g, st = speculative_generate(
                    target, run[0], tok, p, cfg, num_draft_tokens=run[1], confidence=run[2], tree=None
                )  # (the chain: k and confidence are its settings)
                identical &= g.token_ids == want[i]
                if rep == 0:
                    for j, v in enumerate((st.accepted, st.proposed, st.rounds)):
                        stats[name][j] += v
            times[name].append(time.perf_counter() - t)
    generated = sum(map(len, want))
    for e in eagles:
        row[f"{e} agreement on these answers"] = eagle_agreement(target, drafts[e], prompts, want)
        print(f"{e} agreement on these answers: {row[f'{e} agreement on these answers']}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    row.update(prompts=len(prompts), max_new_tokens=args.new_tokens, generated_tokens=generated,
               identical_to_greedy=identical,
               greedy_tokens_per_s=round(generated / med["greedy"], 1))  # fmt: skip
    for name in runs:
        if name == "greedy":
            continue
        acc, prop, rounds = stats[name]
        row[name] = {"acceptance": round(acc / max(prop, 1), 3),
                     "tokens_per_target_forward": round(generated / max(rounds, 1), 3),
                     "speedup": round(med["greedy"] / med[name], 3)}  # fmt: skip
        print(f"{name}: {row[name]}", flush=True)
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
    p.add_argument("--distill-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--draft-layers", type=int, default=None, help="default: the recipe's")
    p.add_argument("--draft", type=Path, default=None, help="measure this draft checkpoint; default: distil one")
    p.add_argument("--eagle", type=Path, nargs="+", default=[], help="also measure these EAGLE draft checkpoints")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="drafted tokens per round (one run each)")
    p.add_argument(
        "--fp32-target",
        dest="quantized_target",
        action="store_false",
        help="draft stage: the target in float32 (default: as lmlab generate runs it, Q4_1 blocks)",
    )
    p.add_argument("--confidence", type=float, nargs="+", default=[0.0], help="draft confidence thresholds")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--prompt-set", choices=["chatterbot", "tweets-en"], default="chatterbot",
                   help="held-out prompts: chatterbot's test user turns or tweets-en's test tweets")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=128)
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
