"""Run folders as pretrain, finetune, eval and inspect leave them, built in seconds for the report tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import lmlab
from lmlab.eval.report import write_results
from lmlab.viz.attention import inspect_attention
from lmlab.viz.curves import plot_training_curves
from tests.viz.conftest import spread

TRICKY = "<script>alert(1)</script> & 你好"  # must come out as text, escaped


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_run(run: Path) -> Path:
    """One folder holding a bit of everything: recipe, curves, finetune summary, eval results, inspect maps."""
    rng = random.Random(0)
    records = [{"step": s, "loss": 4 - s / 40 + rng.random() * 0.1, "lr": 1e-3 * min(1, s / 10)} for s in range(1, 101)]
    records += [{"step": s, "val_loss": 4 - s / 45} for s in (25, 50, 75, 100)]
    _jsonl(run / "metrics.jsonl", records)
    plot_training_curves(records, run / "curves.png")
    ckpt = run / "checkpoints" / "step-000100"
    ckpt.mkdir(parents=True)
    (ckpt / "recipe.yaml").write_text("model:\n  preset: llama-tiny\ntrain:\n  lr: 0.001  # 学习率\n", encoding="utf-8")
    plot_training_curves(records, ckpt / "ignored.png")  # checkpoints are skipped
    summary = {
        "task": "sft", "method": "lora", "parameters": {"trainable": 1234, "total": 56789}, "train": {"steps": 100},
        "prompts": ["What is 2+2?", "中国的首都是哪里？"],
        "before": {"val_loss": 2.5, "answers": ["Five.", TRICKY]},
        "after": {"val_loss": 1.9, "answers": ["Four.", "北京。"]},
        "test": {"n": 50, "accuracy": 0.8, "accuracy_se": 0.05, "macro": {"f1": 0.7, "f1_se": 0.06}, "ece": 0.04},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
    mc = []
    for _ in range(40):
        lls = [rng.uniform(-5, -1) for _ in range(4)]
        pred = max(range(4), key=lls.__getitem__)
        target = rng.randrange(4)
        mc.append({"choices": ["A", "B", "C", "D"], "target": target, "pred": pred, "loglikelihoods": lls,
                   "acc": float(pred == target), "acc_norm": float(pred == target)})  # fmt: skip
    results = {
        "config": {"model": "tiny", "tasks": ["mmlu", "ppl", "chat"], "limit": 40, "num_fewshot": 0},
        "model_hash": "0" * 64,
        "tasks": {
            "mmlu": {"acc": 0.3, "acc_se": 0.07, "acc_norm": 0.32, "acc_norm_se": 0.07, "records": mc,
                     "by_group": {"math": {"n": 20, "acc": 0.25}, "history": {"n": 20, "acc": 0.35}}},
            "ppl": {"perplexity": 20.1, "nll_per_token": 3.0, "nll_per_token_se": 0.05, "bits_per_byte": 1.1},
            "chat": {"output_type": "generate_until", "metrics": ["exact_match"], "exact_match": 0.5,
                     "exact_match_se": 0.1, "records": [{"input": "Hi", "prediction": TRICKY, "references": ["Hello"],
                                                         "exact_match": 0.0}]},
        },
    }  # fmt: skip
    write_results(results, run)  # results.json, report.md, confusion and reliability PNGs
    cfg = lmlab.ModelConfig.from_preset("llama-tiny")
    model = spread(lmlab.Transformer(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    inspect_attention(model, ids, ["The", "␣cat", "，", "中", "国", "。"], run / "inspect", layers="0", heads="0-1")
    return run
