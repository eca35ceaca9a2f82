"""k-fold cross-validation (the seed's answer to "is this score luck?"): train k models, each
validated on the fold it never saw; report each metric's mean and spread, and label-noise
candidates from out-of-fold predictions."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError
from lmlab.finetune.run import finetune_config, load_records, predict, run_records
from lmlab.train.config import Recipe
from lmlab.utils.atomic import write_json


def k_folds(records: list[Any], k: int, seed: int = 0, label_key: str | None = None) -> list[list[int]]:
    """k disjoint folds covering every index once; stratified by `label_key` (each label dealt round-robin)."""
    if k < 2 or k > len(records):
        raise LmlabError(f"k must be between 2 and the number of examples ({len(records)}), got {k}", field="cv")
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r[label_key] if label_key else None, []).append(i)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(offset + j) % k].append(i)
        offset += len(idx)  # the next label starts where this one stopped, so fold sizes stay even
    return [sorted(f) for f in folds]


def cross_validate(recipe: Recipe, k: int, progress: bool = True) -> dict[str, Any]:
    """Train k times on k-1 folds of train + validation, evaluate on the held-out fold; mean and std."""
    ft = finetune_config(recipe)
    label_key = "label" if ft.task == "classification" else None
    pool = list(load_records(recipe, ft, "train") or []) + list(load_records(recipe, ft, "validation") or [])
    folds = k_folds(pool, k, recipe.train.seed, label_key)
    out = Path(recipe.train.out_dir)
    per_fold, oof_probs = [], None
    for i, held in enumerate(folds):
        held_set = set(held)
        records = {
            "train": [r for j, r in enumerate(pool) if j not in held_set],
            "validation": [pool[j] for j in held],
            "test": None,
        }
        train_cfg = dataclasses.replace(recipe.train, out_dir=str(out / f"fold-{i}"))
        fold_recipe = dataclasses.replace(recipe, train=train_cfg)
        s = run_records(fold_recipe, ft, records, progress=progress, keep_model=ft.task == "classification")
        metrics = {k2: v for k2, v in s["after"].items() if isinstance(v, float)}
        per_fold.append(metrics)
        if ft.task == "classification":
            _, _, probs = predict(s["_model"], s["_data"].val)
            if oof_probs is None:
                oof_probs = np.zeros((len(pool), probs.shape[1]))
            oof_probs[held] = probs
            labels = s["_data"].labels
    names = sorted(set().union(*per_fold))
    summary: dict[str, Any] = {"k": k, "folds": [len(f) for f in folds], "per_fold": per_fold, "metrics": {}}
    for name in names:
        values = np.array([m[name] for m in per_fold if name in m], dtype=float)
        summary["metrics"][name] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist(),
        }
    if oof_probs is not None and ft.label_noise_threshold > 0:
        from lmlab.finetune.label_noise import label_noise_report

        ids = [labels.index(str(r["label"])) for r in pool]
        summary["label_noise"] = label_noise_report(oof_probs, ids, pool, labels, out / "label_noise.jsonl",
                                                    threshold=ft.label_noise_threshold)  # fmt: skip
    write_json(out / "cv.json", summary)
    summary["out_dir"] = str(out)
    return summary
