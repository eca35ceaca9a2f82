"""Training settings and YAML recipes with dotted command-line overrides (train.lr=3e-4)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Everything the Trainer does, in one place."""

    out_dir: str = "out/train"
    max_steps: int = 1000
    micro_batch_size: int = 8  # per process, per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    block_size: int = 256
    seed: int = 0
    # optimizer
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9  # SGD
    decay_norms_biases_embeddings: bool = False
    l1: float = 0.0  # explicit penalties added to the loss
    l2: float = 0.0
    grad_clip: float = 1.0  # 0: off
    label_smoothing: float = 0.0
    # schedule
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps spent decaying
    plateau_patience: int = 0  # > 0: halve the lr when validation loss stalls this many evals
    plateau_factor: float = 0.5
    # evaluation, early stopping, checkpoints
    eval_every: int = 100
    eval_batches: int = 20
    early_stopping_patience: int = 0  # 0: off
    early_stopping_min_delta: float = 0.0
    # what "better" means for early stopping and the best checkpoint: val_loss, or a metric from the
    # evaluation function (val_macro_f1, ...); losses, perplexities and errors go down, the rest up
    early_stopping_metric: str = "val_loss"
    checkpoint_every: int = 0  # 0: at each eval
    keep_last: int = 2
    save_checkpoints: bool = True  # False: write nothing (a hyperparameter-search trial keeps only its log)
    nan_patience: int = 5  # stop after this many non-finite losses in a row
    # execution
    device: str = "auto"  # auto: CUDA when there, else the CPU (utils/device.py); or cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32 or bfloat16 (autocast)
    compile: bool = False
    strategy: str = "ddp"  # under torchrun: ddp or fsdp
    log_every: int = 10
    tensorboard: bool = False
    objective: str = "causal_lm"  # causal_lm or masked_lm
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
            ("strategy", self.strategy in ("ddp", "fsdp"), "ddp or fsdp"),
            ("objective", self.objective in ("causal_lm", "masked_lm"), "causal_lm or masked_lm"),
            ("max_steps", self.max_steps > 0, "> 0"),
            ("micro_batch_size", self.micro_batch_size > 0, "> 0"),
            ("grad_accum", self.grad_accum > 0, "> 0"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise LmlabError(f"{getattr(self, name)!r} must be {want}", field=f"train.{name}")


@dataclass
class Recipe:
    """A whole run: model, data and training settings, as in recipes/*.yaml."""

    model: dict[str, Any] = field(default_factory=dict)  # preset + ModelConfig overrides, or init_from
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)  # task, method, lora, freeze, remedies
    tune: dict[str, Any] = field(default_factory=dict)  # hyperparameter search: metric, space
    align: dict[str, Any] = field(default_factory=dict)  # method (rm, dpo, ppo, grpo), beta, loss_type, ...
    prune: dict[str, Any] = field(default_factory=dict)  # gradual pruning (compress/gradual.py): final_sparsity, ...
    distill: dict[str, Any] = field(default_factory=dict)  # knowledge distillation (compress/distill.py): teacher, ...

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as saved beside every checkpoint."""
        train = dataclasses.asdict(self.train)
        train["betas"] = list(train["betas"])
        out = {"model": self.model, "data": self.data, "train": train}
        sections = ("finetune", self.finetune), ("tune", self.tune), ("align", self.align), ("prune", self.prune)
        out.update({k: v for k, v in (*sections, ("distill", self.distill)) if v})
        return out


def coerce(cls: type, values: dict[str, Any], section: str, source: str | None = None) -> dict[str, Any]:
    """Convert YAML strings to the numeric type of each dataclass field's default (YAML 1.1 reads 3e-4 as text)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    out = dict(values)
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                out[key] = (
                    float(value) if isinstance(default, float) or "." in value or "e" in value.lower() else int(value)
                )
            except ValueError:
                raise LmlabError(f"{value!r} is not a number", file=source, field=f"{section}.{key}") from None
    return out


def section_config(
    cls: type, values: dict[str, Any], section: str, source: str | None = None, optional_floats: tuple[str, ...] = ()
) -> Any:
    """A recipe section as `cls`: unknown keys named, YAML text turned into numbers, errors carry the recipe's file.

    `optional_floats` are fields that default to None but take a float when set (YAML 1.1 reads 1e-3 as text).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise LmlabError(f"unknown setting; known: {', '.join(sorted(known))}", file=source,
                             field=f"{section}.{key}")  # fmt: skip
    values = dict(values)
    for key in optional_floats:
        if isinstance(values.get(key), str):
            try:
                values[key] = float(values[key])
            except ValueError:
                raise LmlabError(f"{values[key]!r} is not a number", file=source, field=f"{section}.{key}") from None
    try:
        return cls(**coerce(cls, values, section, source))
    except LmlabError as e:
        e.file = e.file or source
        raise


def _parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 3e-4 -> float, true -> bool, [1, 2] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`train.lr=3e-4`) in a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise LmlabError(f"override {item!r} is not KEY=VALUE", hint="e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LmlabError(f"{part!r} is not a section", field=key)
        node[parts[-1]] = _parse_value(value)
    return d


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start empty), apply overrides, validate every field."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise LmlabError("no such recipe", file=str(path))
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise LmlabError(
                f"invalid YAML: {getattr(e, 'problem', e)}", file=str(path), line=line and line + 1
            ) from None
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, str(path) if path else None)


def recipe_from_dict(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe given as a dict (as read from YAML): sections, every train setting."""
    path = source
    sections = ("model", "data", "train", "finetune", "tune", "align", "prune", "distill")
    unknown = set(raw) - set(sections)
    if unknown:
        raise LmlabError(f"unknown section (sections: {', '.join(sections)})", file=path, field=sorted(unknown)[0])
    cfg = section_config(TrainConfig, raw.get("train") or {}, "train", path)
    return Recipe(
        model=raw.get("model") or {},
        data=raw.get("data") or {},
        train=cfg,
        source=path,
        finetune=raw.get("finetune") or {},
        tune=raw.get("tune") or {},
        align=raw.get("align") or {},
        prune=raw.get("prune") or {},
        distill=raw.get("distill") or {},
    )
