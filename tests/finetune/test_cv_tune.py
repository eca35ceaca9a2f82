"""Cross-validation folds and summaries, the label-noise report, and a resumable Optuna search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from lmlab.finetune.cv import cross_validate, k_folds
from lmlab.finetune.label_noise import flag_label_issues, label_noise_report
from lmlab.train.config import load_recipe


def test_stratified_folds_partition_and_keep_label_shares():
    records = [{"label": "a"}] * 60 + [{"label": "b"}] * 30 + [{"label": "c"}] * 9
    folds = k_folds(records, 3, seed=0, label_key="label")
    assert sorted(i for f in folds for i in f) == list(range(len(records)))  # each example held out once
    for f in folds:
        counts = {lab: sum(records[i]["label"] == lab for i in f) for lab in "abc"}
        assert counts == {"a": 20, "b": 10, "c": 3}
    assert k_folds(records, 3, seed=1, label_key="label") != folds  # the seed matters


def test_label_issues_are_the_confident_disagreements():
    probs = np.array([
        [0.95, 0.05],  # labelled 0, agrees
        [0.85, 0.15],  # labelled 0, agrees (class 0's threshold: mean of 0.95 and 0.85 = 0.90)
        [0.97, 0.03],  # labelled 1 but the model is sure it is 0: flagged first (largest margin)
        [0.55, 0.45],  # labelled 1, model leans 0 but below class 0's threshold: not flagged
        [0.10, 0.90],  # labelled 1, agrees
        [0.90, 0.10],  # labelled 1, model at class 0's threshold: flagged
    ])  # fmt: skip
    labels = [0, 0, 1, 1, 1, 1]
    assert flag_label_issues(probs, labels, threshold=0.5) == [2, 5]
    assert flag_label_issues(probs, labels, threshold=0.96) == [2]  # the floor raises the bar


def test_label_noise_report_writes_the_suspects(tmp_path):
    probs = np.array([[0.9, 0.1], [0.95, 0.05], [0.2, 0.8]])
    records = [{"text": "x", "_file": "f", "_line": 1}, {"text": "y", "_file": "f", "_line": 2}, {"text": "z"}]
    out = label_noise_report(probs, [0, 1, 1], records, ["neg", "pos"], tmp_path / "noise.jsonl", threshold=0.5)
    rows = [json.loads(line) for line in (tmp_path / "noise.jsonl").read_text().splitlines()]
    assert out["flagged"] == 1 and rows[0]["text"] == "y" and rows[0]["given"] == "pos" and rows[0]["line"] == 2


def _recipe(tmp_path, base, data, **train):
    recipe = {
        "model": {"init_from": str(base), "cls_pooling": "mean"},
        "finetune": {"task": "classification", "method": "full", "epochs": 2, "max_len": 16,
                     "label_noise_threshold": 0.5},
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")},
        "train": {"out_dir": str(tmp_path / "out"), "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 12, "eval_batches": 100, "early_stopping_metric": "val_macro_f1", "log_every": 6,
                  **train},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cross_validation_reports_mean_and_spread(tmp_path, tiny_bert, sentiment_data):
    summary = cross_validate(load_recipe(_recipe(tmp_path, tiny_bert, sentiment_data)), 3, progress=False)
    assert summary["folds"] == [160, 160, 160]  # 384 train + 96 validation, in 3 folds
    f1 = summary["metrics"]["val_macro_f1"]
    values = [fold["val_macro_f1"] for fold in summary["per_fold"]]
    assert f1["values"] == values and len({round(v, 6) for v in values}) > 1  # three different models
    assert f1["mean"] == pytest.approx(np.mean(values)) and f1["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["label_noise"]["probabilities"] == "out-of-fold"
    assert (tmp_path / "out" / "fold-2" / "final" / "config.json").exists()


def test_tune_resumes_and_compares_with_the_default(tmp_path, tiny_bert, sentiment_data):
    import optuna

    from lmlab.finetune.tune import tune

    path = _recipe(tmp_path, tiny_bert, sentiment_data)
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["tune"] = {"metric": "val_macro_f1", "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                                       "finetune.epochs": [1, 2]}}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    first = tune(recipe, trials=2)
    assert first["trials"] == 2 and first["default"]["params"] == {"train.lr": 3e-3, "finetune.epochs": 2}
    # a killed search leaves a RUNNING trial behind; resuming fails it and carries on to the target
    study = optuna.load_study(study_name="lmlab", storage=f"sqlite:///{tmp_path / 'out' / 'tune' / 'study.db'}")
    study.ask()
    report = tune(recipe, trials=3)
    assert report["trials"] == 3 and len(report["all"]) == 3
    lrs = [r["params"]["train.lr"] for r in report["all"]]
    assert len(set(lrs)) == 3  # the resumed sampler does not replay the first run's draws
    reloaded = optuna.load_study(study_name="lmlab", storage=f"sqlite:///{tmp_path / 'out' / 'tune' / 'study.db'}")
    assert sum(t.state.name == "FAIL" for t in reloaded.trials) == 1
    assert report["best"]["value"] >= report["default"]["value"]
    assert (tmp_path / "out" / "tune" / "search.png").stat().st_size > 0
    trial = tmp_path / "out" / "tune" / "trial-001"
    assert (trial / "metrics.jsonl").exists() and not (trial / "final").exists()  # trials keep no weights
    assert "default" in (tmp_path / "out" / "tune" / "report.md").read_text()
