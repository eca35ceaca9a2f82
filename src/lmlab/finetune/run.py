"""Fine-tuning from a recipe: data -> base checkpoint (+ head, LoRA or freezing) -> Trainer -> report.

One function per step so that `lmlab finetune`, cross-validation and hyperparameter search share
them: `load_records` reads a split, `run_records` trains and evaluates on given records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.finetune import sft as sft_data
from lmlab.finetune import task_data
from lmlab.finetune.adversarial import adversarial_loss
from lmlab.finetune.freeze import freeze, trainable_summary
from lmlab.finetune.lora import LoraConfig, apply_lora
from lmlab.finetune.objectives import classification_loss, model_inputs
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.train.config import Recipe, coerce, section_config
from lmlab.train.trainer import Trainer, to_device
from lmlab.utils.atomic import write_json, write_text

TASKS = ("sft", "classification", "ner", "lm")
METHODS = ("full", "lora", "freeze")
SPLITS = ("train", "validation", "test")


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a recipe."""

    task: str = "sft"  # sft, classification, ner, lm (continued pretraining on domain text)
    method: str = "lora"  # full, lora, freeze
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, targets, use_rslora
    freeze: list[str] = field(default_factory=list)  # embeddings, layers.0-5, ... (method freeze)
    epochs: float = 0.0  # > 0: sets train.max_steps from the data size
    max_len: int = 128  # classification / NER: tokens per example (SFT and lm use train.block_size)
    pack: bool = True  # sft / lm: pack examples into full rows
    class_weights: str | None = None  # inverse, sqrt_inverse, effective
    sampling: str = "uniform"  # balanced: oversample minority classes each epoch
    adversarial: dict[str, Any] | None = None  # {method: fgm|pgd, epsilon, alpha, steps}
    cls_dropout: float | None = None  # dropout before the classifier
    label_noise_threshold: float = 0.0  # > 0: a report of training examples the model confidently disagrees with
    extend_vocab: bool = False  # add characters the tokenizer maps to [UNK] (Chinese in an English vocabulary)
    samples: list[str] = field(default_factory=list)  # sft: prompts answered before and after
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        checks = [
            ("task", self.task in TASKS, f"one of {', '.join(TASKS)}"),
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("epochs", self.epochs >= 0, ">= 0"),
            ("max_len", self.max_len > 1, "> 1"),
            ("sampling", self.sampling in ("uniform", "balanced"), "uniform or balanced"),
            ("class_weights", self.class_weights in (None, *task_data.WEIGHT_KINDS),
             f"one of {', '.join(task_data.WEIGHT_KINDS)}"),
        ]  # fmt: skip
        for name, ok, want in checks:
            if not ok:
                raise LmlabError(f"{getattr(self, name)!r} must be {want}", field=f"finetune.{name}")
        if self.method == "freeze" and not self.freeze:
            raise LmlabError("method freeze needs a list of what to freeze", field="finetune.freeze")
        if self.extend_vocab and (self.method == "lora" or "embeddings" in self.freeze):
            raise LmlabError("new tokens need a trainable embedding", field="finetune.extend_vocab",
                             hint="use method full, or freeze other parts")  # fmt: skip


def finetune_config(recipe: Recipe) -> FinetuneConfig:
    """The recipe's `finetune:` section, validated (unknown keys named)."""
    return section_config(FinetuneConfig, recipe.finetune, "finetune", recipe.source)


# -- data -------------------------------------------------------------------------------------------
def split_path(data: dict[str, Any], split: str) -> Path | None:
    """The JSONL file of a split: data.<split> if given, else the fetched data.dataset's."""
    if data.get(split):
        return Path(data[split])
    if data.get("dataset"):
        from lmlab.data import fetch

        path = Path(fetch(data["dataset"])) / f"{split}.jsonl"
        return path if path.exists() else None
    if split == "train":
        raise LmlabError("the recipe names no data: set data.dataset (a fetched set) or data.train", field="data")
    return None


def _select(path: Path, data: dict[str, Any], split: str, out_dir: Path, seed: int) -> Path:
    """Apply data.where (field equality) and data.limit (a seeded sample) to a split; the kept lines
    are written under out_dir/data so the run records exactly what it used."""
    where = data.get("where") or {}
    limit = (data.get("limit") or {}).get(split)
    if not where and not limit:
        return path
    lines = [(n, obj) for n, obj in task_data.iter_jsonl(path) if all(obj.get(k) == v for k, v in where.items())]
    if limit and len(lines) > int(limit):
        rng = random.Random(seed)
        lines = sorted(rng.sample(lines, int(limit)), key=lambda x: x[0])
    if not lines:
        raise LmlabError(f"no record matches data.where {where}", file=str(path), field="data.where")
    out = out_dir / "data" / f"{split}.jsonl"
    write_text(out, "".join(json.dumps(obj, ensure_ascii=False) + "\n" for _, obj in lines))
    return out


def load_records(recipe: Recipe, ft: FinetuneConfig, split: str) -> list[Any] | None:
    """A split's validated records for the recipe's task (None when the split does not exist)."""
    data = recipe.data
    path = split_path(data, split)
    if path is None:
        return None
    path = _select(path, data, split, Path(recipe.train.out_dir), recipe.train.seed)
    if ft.task == "sft":
        return sft_data.read_sft_jsonl(path)
    if ft.task == "classification":
        return task_data.read_classification_jsonl(path, data.get("text_field", "text"),
                                                   data.get("label_field", "label"))  # fmt: skip
    if ft.task == "ner":
        return task_data.read_ner_jsonl(path)
    return task_data.read_classification_jsonl(path, data.get("text_field", "text"), None)


# -- model ------------------------------------------------------------------------------------------
def load_base(recipe: Recipe, ft: FinetuneConfig, labels: list[str] | None) -> tuple[Transformer, Tokenizer]:
    """The base checkpoint (model.init_from), with a fresh task head for classification and NER."""
    from lmlab.model.checkpoint import load_pretrained

    spec = dict(recipe.model)
    base = spec.pop("init_from", None)
    if base is None:
        raise LmlabError("fine-tuning starts from a checkpoint: set model.init_from", file=recipe.source,
                         field="model.init_from")  # fmt: skip
    overrides = coerce(ModelConfig, spec, "model", recipe.source)
    if ft.task in ("classification", "ner"):
        overrides.update(head="seq_cls" if ft.task == "classification" else "token_cls", num_labels=len(labels),
                         labels=list(labels))  # fmt: skip
        if ft.cls_dropout is not None:
            overrides["cls_dropout"] = ft.cls_dropout
    model, tokenizer = load_pretrained(base, **overrides)
    if tokenizer is None:
        raise LmlabError("the base checkpoint has no tokenizer", file=str(base))
    if ft.task == "classification" and model.cfg.pad_token_id is None:
        model.cfg.pad_token_id = task_data.pad_id(tokenizer)
    return model, tokenizer


def prepare_model(model: Transformer, ft: FinetuneConfig, seed: int) -> dict[str, Any]:
    """Apply the method: LoRA adapters (head trained fully), freezing, or nothing; returns parameter counts."""
    torch.manual_seed(seed)
    if ft.method == "lora":
        spec = dict(ft.lora)
        to_save = [m for m in ("classifier",) if getattr(model, m, None) is not None]
        if model.cfg.head == "seq_cls" and model.cfg.cls_pooling == "pooler":
            to_save.append("pooler")
        spec.setdefault("modules_to_save", to_save)
        try:
            apply_lora(model, LoraConfig(**spec))
        except TypeError as e:
            raise LmlabError(f"bad LoRA setting: {e}", field="finetune.lora") from None
    elif ft.method == "freeze":
        freeze(model, ft.freeze)
    return trainable_summary(model)


# -- datasets, losses, metrics per task -----------------------------------------------------------
@dataclass
class TaskData:
    """What the Trainer needs for one task."""

    train: Any
    val: Any | None
    test: Any | None
    loss_fn: Callable
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None
    info: dict[str, Any]
    labels: list[str] | None = None


def _text_examples(tokenizer: Tokenizer, records: list[dict[str, Any]], block: int) -> list[sft_data.SFTExample]:
    """Plain documents for continued pretraining: every token is a target, each ends with EOS."""
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        ids = tokenizer.encode(r["text"], add_special_tokens=False) + ([eos] if eos is not None else [])
        for start in range(0, len(ids), block):  # long documents become several rows
            chunk = ids[start : start + block]
            if len(chunk) > 1:
                out.append(sft_data.SFTExample(chunk, [-100, *chunk[1:]]))
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Any, batch_size: int = 32) -> tuple[list, list, np.ndarray]:
    """(true label ids, predicted ids, probabilities) for every example of a classification or NER set."""
    model.eval()
    y_true, y_pred, probs = [], [], []
    device = next(model.parameters()).device
    for batch in dataset.iter_eval(batch_size):
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], **model_inputs(batch)).float()
        p = torch.softmax(logits, -1).cpu()  # metrics are computed on the host
        batch = to_device(batch, torch.device("cpu"))
        if "labels" in batch:
            y_true.append(batch["labels"])
        y_pred.append(p.argmax(-1))
        probs.append(p)
    if logits.dim() == 3:  # token classification: keep per-batch tensors, rows have different widths
        return y_true, y_pred, probs
    cat = lambda xs: torch.cat(xs).tolist() if xs else []
    return cat(y_true), cat(y_pred), torch.cat(probs).numpy()


def classification_metrics(model, dataset, prefix: str = "val_") -> dict[str, float]:
    """Accuracy and macro-F1 of a classifier on a dataset (the Trainer's periodic evaluation)."""
    from lmlab.eval.metrics import accuracy, precision_recall_f1

    y_true, y_pred, _ = predict(model, dataset)
    prf = precision_recall_f1(y_true, y_pred)
    return {f"{prefix}accuracy": accuracy(y_true, y_pred), f"{prefix}macro_f1": prf["macro"]["f1"]}


def ner_tags(model, dataset) -> tuple[list[list[str]], list[list[str]]]:
    """(true, predicted) word-level tags of every example."""
    _, y_pred, _ = predict(model, dataset)
    pred = dataset.predicted_tags(y_pred)
    true = [list(r["tags"]) for r in dataset.records]
    return true, pred


def ner_metrics(model, dataset, prefix: str = "val_") -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval's definition)."""
    from lmlab.eval.entities import entity_f1

    true, pred = ner_tags(model, dataset)
    scores = entity_f1(true, pred)
    return {f"{prefix}entity_{k}": scores[k] for k in ("precision", "recall", "f1")}


def build_task_data(
    ft: FinetuneConfig,
    recipe: Recipe,
    tokenizer: Tokenizer,
    records: dict[str, list | None],
    labels: list[str] | None,
    rows: int,
) -> TaskData:
    """Datasets, loss and evaluation function of the recipe's task."""
    cfg, seed = recipe.train, recipe.train.seed
    smoothing = cfg.label_smoothing
    if ft.task in ("sft", "lm"):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

        def dataset(recs, shuffle):
            if recs is None:
                return None, None
            if ft.task == "sft":
                recs = [{"messages": m} for m in recs]
                return sft_data.build_sft_data(tokenizer, recs, cfg.block_size, rows, pack=ft.pack, shuffle=shuffle,
                                               seed=seed, pad_id=pad)  # fmt: skip
            data = sft_data.SFTDataset(_text_examples(tokenizer, recs, cfg.block_size), rows, cfg.block_size,
                                       pack=ft.pack, shuffle=shuffle, seed=seed, pad_id=pad)  # fmt: skip
            return data, data.stats()

        train, stats = dataset(records["train"], True)
        val, _ = dataset(records.get("validation"), False)
        test, _ = dataset(records.get("test"), False)
        loss = sft_data.sft_loss
        if smoothing:
            raise LmlabError("label smoothing applies to classification tasks", field="train.label_smoothing")
        info = {"data": stats.to_dict()}
        return TaskData(train, val, test, _maybe_adversarial(loss, ft), None, info)

    lm = task_data.LabelMap(labels)
    kind = task_data.ClassificationDataset if ft.task == "classification" else task_data.TokenClassificationDataset
    extra = {"sampling": ft.sampling} if ft.task == "classification" else {}
    train = kind(tokenizer, records["train"], lm, rows, max_len=ft.max_len, shuffle=True, seed=seed, **extra)
    val = test = None
    if records.get("validation"):
        val = kind(tokenizer, records["validation"], lm, rows, max_len=ft.max_len, shuffle=False)
    if records.get("test"):
        test = kind(tokenizer, records["test"], lm, rows, max_len=ft.max_len, shuffle=False)
    weights = None
    info: dict[str, Any] = {"examples": {s: len(r) for s, r in records.items() if r}, "truncated": train.truncated}
    if ft.task == "classification":
        counts = np.bincount(train.labels, minlength=len(lm))
        info["label_counts"] = {lab: int(c) for lab, c in zip(lm.labels, counts)}
        if ft.class_weights:
            weights = task_data.class_weights(train.labels, len(lm), ft.class_weights)
            info["class_weights"] = {lab: round(float(w), 4) for lab, w in zip(lm.labels, weights)}
    loss = lambda m, b: classification_loss(m, b, class_weights=weights, label_smoothing=smoothing)
    if ft.task == "classification":
        eval_fn = (lambda m: classification_metrics(m, val)) if val is not None else None
    else:
        eval_fn = (lambda m: ner_metrics(m, val)) if val is not None else None
    return TaskData(train, val, test, _maybe_adversarial(loss, ft), eval_fn, info, lm.labels)


def _maybe_adversarial(loss: Callable, ft: FinetuneConfig) -> Callable:
    if not ft.adversarial:
        return loss
    spec = {k: (float(v) if k in ("epsilon", "alpha") else v) for k, v in ft.adversarial.items()}
    try:
        return adversarial_loss(loss, **spec)
    except TypeError as e:
        raise LmlabError(f"bad adversarial setting: {e}", field="finetune.adversarial") from None


# -- reports ----------------------------------------------------------------------------------------
def test_report(model, data: TaskData, ft: FinetuneConfig, out: Path, split: str = "test") -> dict[str, Any]:
    """Held-out metrics with bootstrap standard errors, and plots (confusion matrix, reliability)."""
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        return {}
    if ft.task == "classification":
        from lmlab.eval.calibration import (
            calibration_bins,
            confusion_matrix,
            expected_calibration_error,
            plot_confusion,
            plot_reliability,
        )
        from lmlab.eval.scoring import score_classification

        y_true, y_pred, probs = predict(model, dataset)
        names = data.labels
        report = score_classification([names[i] for i in y_true], [names[i] for i in y_pred])
        conf = probs.max(1).tolist()
        correct = [float(t == p) for t, p in zip(y_true, y_pred)]
        report["ece"] = expected_calibration_error(conf, correct)
        matrix, _ = confusion_matrix([names[i] for i in y_true], [names[i] for i in y_pred], names)
        report["confusion_matrix"] = matrix
        report["plots"] = [
            str(plot_confusion(matrix, names, out / f"{split}_confusion.png", title=f"{split} confusion matrix")),
            str(plot_reliability(calibration_bins(conf, correct), out / f"{split}_reliability.png",
                                 title=f"{split} reliability (ECE {report['ece']:.3f})")),
        ]  # fmt: skip
        return report
    if ft.task == "ner":
        from lmlab.eval.entities import entity_f1

        true, pred = ner_tags(model, dataset)
        return entity_f1(true, pred)
    return {}


@torch.no_grad()
def held_out_loss(model, dataset, loss_fn) -> float | None:
    """Mean loss over a whole held-out set (one pass, every batch)."""
    if dataset is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    losses = [float(loss_fn(model, to_device(dataset.get_batch(i), device))) for i in range(dataset.steps_per_epoch)]
    return float(np.mean(losses))


def answer(model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy chat answers to each prompt (one user turn, the checkpoint's chat template)."""
    from lmlab.generate import generate

    model.eval()
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts]  # fmt: skip
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in rendered]
    return [g.text.strip() for g in generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0)]


# -- the run ----------------------------------------------------------------------------------------
def _max_steps(ft: FinetuneConfig, cfg, train: Any) -> int:
    if not ft.epochs:
        return cfg.max_steps
    return max(1, math.ceil(ft.epochs * train.steps_per_epoch))


def run_records(
    recipe: Recipe,
    ft: FinetuneConfig,
    records: dict[str, list | None],
    *,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    report: bool = True,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Fine-tune on the given records (train, validation, test) and evaluate; returns the summary
    (with keep_model, also the trained model and task data under "_model" and "_data")."""
    cfg = recipe.train
    out = Path(cfg.out_dir)
    labels = None
    if ft.task in ("classification", "ner"):
        labels = task_data.LabelMap.from_records(records["train"]).labels
    model, tokenizer = load_base(recipe, ft, labels)
    added = 0
    if ft.extend_vocab:
        from lmlab.finetune.vocab import extend_vocabulary, unknown_characters

        texts = (r.get("text") or "".join(r.get("tokens", [])) for r in records["train"])
        added = extend_vocabulary(model, tokenizer, unknown_characters(tokenizer, texts), seed=cfg.seed)
    params = prepare_model(model, ft, cfg.seed)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rows = cfg.micro_batch_size * cfg.grad_accum * world
    data = build_task_data(ft, recipe, tokenizer, records, labels, rows)
    cfg = dataclasses.replace(cfg, max_steps=_max_steps(ft, cfg, data.train))
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps // 2)
    recipe = dataclasses.replace(recipe, train=cfg)
    summary: dict[str, Any] = {"task": ft.task, "method": ft.method, "parameters": params, **data.info,
                               "max_steps": cfg.max_steps}  # fmt: skip
    if ft.extend_vocab:
        summary["added_tokens"] = added
    prompts = list(ft.samples) if ft.task == "sft" else []
    summary["prompts"] = prompts
    if not resume and report:
        summary["before"] = {"val_loss": held_out_loss(model, data.val, data.loss_fn)}
        if data.eval_fn is not None:
            summary["before"].update(data.eval_fn(model))
        if prompts:
            summary["before"]["answers"] = answer(model, tokenizer, prompts, ft.sample_tokens)
    from lmlab.compress.gradual import recipe_callbacks

    trainer = Trainer(model, data.train, cfg, val_data=data.val, tokenizer=tokenizer, loss_fn=data.loss_fn,
                      recipe=recipe.to_dict(), progress=progress, eval_fn=data.eval_fn, on_eval=on_eval,
                      callbacks=recipe_callbacks(recipe))  # fmt: skip
    summary["train"] = trainer.fit(resume=resume)
    if not trainer.dist.main:
        return summary
    model = trainer.raw
    if report:
        summary["after"] = {"val_loss": held_out_loss(model, data.val, data.loss_fn)}
        if prompts:
            summary["after"]["answers"] = answer(model, tokenizer, prompts, ft.sample_tokens)
        if data.eval_fn is not None:
            summary["after"].update(data.eval_fn(model))
        summary["test"] = test_report(model, data, ft, out)
        if ft.task == "classification" and ft.label_noise_threshold > 0:
            from lmlab.finetune.label_noise import label_noise_report

            _, _, probs = predict(model, data.train)  # iter_eval: record order
            summary["label_noise"] = label_noise_report(
                probs, data.train.labels, records["train"], data.labels, out / "label_noise.jsonl",
                threshold=ft.label_noise_threshold, in_sample=True,
            )  # fmt: skip
    summary["out_dir"] = str(out)
    summary["model"] = str(out / "final")
    write_json(out / "summary.json", _jsonable(summary))
    if keep_model:
        summary["_model"], summary["_data"] = model, data
    return summary


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def finetune(
    recipe: Recipe,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run a fine-tuning recipe end to end: read its data, train, evaluate, report."""
    ft = finetune_config(recipe)
    records = {split: load_records(recipe, ft, split) for split in SPLITS}
    return run_records(recipe, ft, records, resume=resume, progress=progress, on_eval=on_eval)
