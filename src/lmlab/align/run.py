"""Alignment from a recipe: `lmlab align rm|dpo|ppo|grpo --config recipes/align/NAME.yaml`.

Each method builds its model(s), data object and loss, hands them to the shared Trainer, and measures the
policy (or reward model) before and after; the summary goes to OUT/summary.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.align import pairs as built
from lmlab.align.data import build_pairs, read_prompts
from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.train.config import Recipe, coerce, section_config
from lmlab.train.trainer import Trainer
from lmlab.utils.atomic import write_json

METHODS = ("rm", "dpo", "ppo", "grpo")


@dataclass
class AlignConfig:
    """The `align:` section of a recipe (fields a method does not use are ignored by it)."""

    method: str = "dpo"  # rm | dpo | ppo | grpo
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, targets}: train LoRA adapters; None: all weights
    # DPO
    beta: float | None = None  # DPO's beta (default 0.1); GRPO's KL weight (default 0: no reference model)
    loss_type: str | None = None  # dpo: sigmoid | ipo | robust | hinge; grpo: grpo | bnpo | dr_grpo | dapo
    label_smoothing: float = 0.0  # dpo: conservative / robust DPO's assumed label-flip rate
    # reward model
    center_rewards: float = 0.0  # coefficient of mean((r_c + r_r)^2)
    # online methods (PPO, GRPO): generation
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    minibatches: int = 1  # a rollout holds minibatches x (micro_batch_size x grad_accum x processes) completions
    epochs: int = 1  # updates per minibatch of a rollout (PPO epochs; GRPO's num_iterations)
    # GRPO
    num_generations: int = 4
    reward_funcs: list[str] = field(default_factory=lambda: ["answer_correct"])
    reward_weights: list[float] | None = None
    scale_rewards: bool = True  # False: A = r - mean (Dr. GRPO)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher; None: = epsilon
    log_completions_every: int = 10  # steps between samples written to OUT/completions.jsonl (0: never)
    # PPO
    reward_model: str | None = None  # a saved reward model (PPO's reward; DPO/GRPO: scores before/after)
    value_model: str | None = None  # the value model's initial weights (default: the reward model's)
    kl_coef: float = 0.05
    kl_target: float | None = None  # set: Ziegler et al.'s adaptive controller toward this KL per completion
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # k1 | k3
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    # before/after measurements
    eval_prompts: int = 64  # held-out prompts answered greedily before and after (online methods, DPO)
    eval_max_new_tokens: int = 32
    ref_batch_size: int = 8

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("num_generations", self.num_generations >= 2 or self.method != "grpo", ">= 2 (a group compares)"),
            ("kl_estimator", self.kl_estimator in ("k1", "k3"), "k1 or k3"),
            ("minibatches", self.minibatches >= 1, ">= 1"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0 (rollouts sample)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise LmlabError(f"{getattr(self, name)!r} must be {want}", field=f"align.{name}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]


def align_config(recipe: Recipe) -> AlignConfig:
    """The recipe's `align:` section, validated (unknown keys named)."""
    return section_config(AlignConfig, recipe.align, "align", recipe.source,
                          optional_floats=("beta", "epsilon_high", "kl_target"))  # fmt: skip


# -- shared steps -----------------------------------------------------------------------------------
def _rows(recipe: Recipe) -> int:
    cfg = recipe.train
    return cfg.micro_batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))


def data_paths(recipe: Recipe, kind: str) -> dict[str, Path | None]:
    """{train, validation} JSONL paths: data.train / data.validation, a set built here (arithmetic-*,
    *-mismatched), or a fetched data.dataset's splits."""
    from lmlab.finetune.run import split_path

    data = recipe.data
    name = data.get("dataset")
    if data.get("train"):  # explicit files win over a named set
        return {s: Path(data[s]) if data.get(s) else None for s in ("train", "validation")}
    if built.is_builtin(name):
        sizes = {s: data.get(f"{s}_size", d) for s, d in (("train", 1000), ("validation", 200))}
        out = Path(recipe.train.out_dir) / "data"
        return built.build(name, out, kind, sizes, recipe.train.seed, data.get("where"))
    from lmlab.finetune.run import _select

    out = {s: split_path(data, s) for s in ("train", "validation")}
    # data.where / data.limit as fine-tuning applies them (the kept lines go to OUT/data)
    return {s: p and _select(p, data, s, Path(recipe.train.out_dir), recipe.train.seed) for s, p in out.items()}


def load_policy(recipe: Recipe, ac: AlignConfig, **head: Any) -> tuple[Transformer, Tokenizer]:
    """The starting checkpoint (model.init_from, ModelConfig overrides), with LoRA when asked."""
    from lmlab.finetune.lora import LoraConfig, apply_lora
    from lmlab.model.checkpoint import load_pretrained

    spec = dict(recipe.model)
    base = spec.pop("init_from", None)
    if base is None:
        raise LmlabError("alignment starts from a checkpoint: set model.init_from", file=recipe.source,
                         field="model.init_from")  # fmt: skip
    model, tokenizer = load_pretrained(base, **coerce(ModelConfig, spec, "model", recipe.source), **head)
    if tokenizer is None:
        raise LmlabError("the checkpoint has no tokenizer", file=str(base), field="model.init_from")
    if head.get("head") == "seq_cls" and model.cfg.pad_token_id is None:
        from lmlab.finetune.task_data import pad_id

        model.cfg.pad_token_id = pad_id(tokenizer)  # transformers finds the last real token by it
    if ac.lora is not None:
        spec = dict(ac.lora)
        if model.cfg.head == "seq_cls":
            spec.setdefault("modules_to_save", ["classifier"])
        torch.manual_seed(recipe.train.seed)
        try:
            apply_lora(model, LoraConfig(**spec))
        except TypeError as e:
            raise LmlabError(f"bad LoRA setting: {e}", field="align.lora") from None
    return model, tokenizer


# the curves each method draws (OUT/align_curves.png), beside the Trainer's loss curves (OUT/curves.png)
CURVES = {
    "rm": ["loss", "accuracy", "margin", "val_accuracy", "val_margin", "val_loss"],
    "dpo": ["loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "val_reward_accuracy",
            "val_reward_margin"],
    "grpo": ["loss", "reward", "pass_rate", "kl", "entropy", "completion_length", "frac_zero_std", "clip_ratio"],
    "ppo": ["loss", "score", "kl", "kl_coef", "entropy", "value_loss", "policy_loss", "clip_ratio"],
}  # fmt: skip


def _finish(summary: dict[str, Any], trainer: Trainer, out: Path) -> dict[str, Any]:
    from lmlab.viz.panels import plot_metric_panels

    if trainer.dist.main:
        records = trainer.records()
        if records:
            method = summary["method"]
            keys = CURVES[method] + sorted({k for r in records for k in r if k.startswith("reward/")})
            path = plot_metric_panels(records, keys, out / "align_curves.png", f"lmlab align {method}")
            summary["curves"] = str(path)
        summary["out_dir"], summary["model"] = str(out), str(out / "final")
        if summary["method"] != "rm" and summary.get("before") and summary.get("after"):
            from lmlab.align.evaluate import paired_change

            summary["change"] = paired_change(summary["before"], summary["after"])
        from lmlab.finetune.run import _jsonable

        write_json(out / "summary.json", _jsonable(summary))
    return summary


def _trainer(recipe: Recipe, model, data, loss, tokenizer, val=None, eval_fn=None, progress=True) -> Trainer:
    cfg = recipe.train
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps // 2)
    return Trainer(model, data, cfg, val_data=val, tokenizer=tokenizer, loss_fn=loss, recipe=recipe.to_dict(),
                   progress=progress, eval_fn=eval_fn)  # fmt: skip


def _eval_prompts(recipe: Recipe, ac: AlignConfig, paths: dict[str, Path | None]):
    path = paths.get("validation") or paths["train"]
    return read_prompts(path)[: ac.eval_prompts]


# -- the methods -------------------------------------------------------------------------------------
def run_rm(recipe: Recipe, ac: AlignConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a reward model on preference pairs; held-out pair accuracy before and after."""
    from lmlab.align.reward_model import RewardLoss, pair_accuracy

    paths = data_paths(recipe, "pairs")
    model, tok = load_policy(recipe, ac, head="seq_cls", num_labels=1, labels=["reward"])
    cfg = recipe.train
    train, stats = build_pairs(tok, paths["train"], cfg.block_size, _rows(recipe), seed=cfg.seed)
    val = None
    if paths.get("validation"):
        val, _ = build_pairs(tok, paths["validation"], cfg.block_size, _rows(recipe), shuffle=False)
    loss = RewardLoss(ac.center_rewards)
    eval_fn = (lambda m: pair_accuracy(m, val)) if val is not None else None
    trainer = _trainer(recipe, model, train, loss, tok, val, eval_fn, progress)
    summary: dict[str, Any] = {"method": "rm", "data": stats, "chance_accuracy": 0.5}
    if val is not None and not resume:
        summary["before"] = pair_accuracy(trainer.raw, val)
    summary["train"] = trainer.fit(resume=resume)
    if val is not None:
        summary["after"] = pair_accuracy(trainer.raw, val)
    return _finish(summary, trainer, Path(cfg.out_dir))


def run_dpo(recipe: Recipe, ac: AlignConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """DPO (or IPO, robust, hinge) on preference pairs with cached reference log-probs."""
    from lmlab.align.dpo import DPOLoss
    from lmlab.align.reference import pair_reference

    paths = data_paths(recipe, "pairs")
    model, tok = load_policy(recipe, ac)
    cfg = recipe.train
    out = Path(cfg.out_dir)
    train, stats = build_pairs(tok, paths["train"], cfg.block_size, _rows(recipe), seed=cfg.seed)
    val = None
    if paths.get("validation"):
        val, _ = build_pairs(tok, paths["validation"], cfg.block_size, _rows(recipe), shuffle=False)
    loss = DPOLoss(ac.beta if ac.beta is not None else 0.1, ac.loss_type or "sigmoid", ac.label_smoothing)
    eval_fn = (lambda m: loss.evaluate(m, val)) if val is not None else None
    trainer = _trainer(recipe, model, train, loss, tok, val, eval_fn, progress)
    # reference log-probs: once, from the starting weights (adapters off), cached beside the run
    pair_reference(trainer.raw, train, out / "reference" / "train.safetensors", ac.ref_batch_size, trainer.dist)
    if val is not None:
        pair_reference(trainer.raw, val, out / "reference" / "validation.safetensors", ac.ref_batch_size,
                       trainer.dist)  # fmt: skip
    summary: dict[str, Any] = {"method": "dpo", "loss_type": loss.loss_type, "beta": loss.beta, "data": stats}
    scorer, prompts = _scorer(ac), _pair_prompts(paths, ac)
    if not resume:
        summary["before"] = _measure(trainer, tok, prompts, ac, scorer, val, loss)
    summary["train"] = trainer.fit(resume=resume)
    summary["after"] = _measure(trainer, tok, prompts, ac, scorer, val, loss)
    return _finish(summary, trainer, out)


def _scorer(ac: AlignConfig):
    if not ac.reward_model:
        return None
    from lmlab.align.reward_model import RewardScorer

    return RewardScorer.load(ac.reward_model)


def _pair_prompts(paths, ac: AlignConfig):
    from lmlab.align.data import PromptRecord, read_pairs

    path = paths.get("validation") or paths["train"]
    return [PromptRecord(p.messages) for p in read_pairs(path)[: ac.eval_prompts]]


def _measure(trainer: Trainer, tok, prompts, ac: AlignConfig, scorer, val=None, loss=None) -> dict[str, Any]:
    from lmlab.align.evaluate import policy_report

    if not trainer.dist.main:
        return {}
    policy = getattr(trainer.raw, "policy", trainer.raw)
    out = policy_report(policy, tok, prompts, max_new_tokens=ac.eval_max_new_tokens, scorer=scorer)
    if val is not None and loss is not None:
        out.update(loss.evaluate(trainer.raw, val))
    return out


def _generation(ac: AlignConfig):
    from lmlab.generate.config import GenerationConfig

    return GenerationConfig(max_new_tokens=ac.max_new_tokens, temperature=ac.temperature, top_p=ac.top_p,
                            top_k=ac.top_k)  # fmt: skip


def run_grpo(recipe: Recipe, ac: AlignConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """GRPO on prompts with verifiable rewards; held-out pass rate of greedy answers before and after."""
    from lmlab.align.grpo import GRPOLoss, GRPORollouts
    from lmlab.align.rewards import load_reward, reward_name

    funcs = {reward_name(s): load_reward(s) for s in ac.reward_funcs}
    paths = data_paths(recipe, "prompts")
    model, tok = load_policy(recipe, ac)
    cfg = recipe.train
    out = Path(cfg.out_dir)
    beta = ac.beta if ac.beta is not None else 0.0
    loss = GRPOLoss(beta, ac.loss_type or "dapo", ac.epsilon, ac.epsilon_high, ac.max_new_tokens, ac.temperature)
    data = GRPORollouts(read_prompts(paths["train"]), tok, _rows(recipe), completions_per_prompt=ac.num_generations,
                        minibatches=ac.minibatches, epochs=ac.epochs, generation=_generation(ac), seed=cfg.seed,
                        metrics=loss.metrics, reward_funcs=funcs, reward_weights=ac.reward_weights,
                        scale_rewards=ac.scale_rewards, beta=beta, temperature=ac.temperature,
                        log_completions_every=ac.log_completions_every, log_file=out / "completions.jsonl",
                        main=int(os.environ.get("RANK", 0)) == 0)  # fmt: skip
    trainer = _trainer(recipe, model, data, loss, tok, progress=progress)
    data.set_policy(trainer.raw)
    summary: dict[str, Any] = {"method": "grpo", "loss_type": loss.loss_type, "beta": beta,
                               "num_generations": ac.num_generations, "reward_funcs": list(funcs)}  # fmt: skip
    prompts, scorer = _eval_prompts(recipe, ac, paths), _scorer(ac)
    if not resume:
        summary["before"] = _measure(trainer, tok, prompts, ac, scorer)
    summary["train"] = trainer.fit(resume=resume)
    summary["after"] = _measure(trainer, tok, prompts, ac, scorer)
    return _finish(summary, trainer, out)


def run_ppo(recipe: Recipe, ac: AlignConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """PPO against a reward model with a KL penalty; the RM score of greedy answers before and after."""
    from lmlab.align.ppo import ActorCritic, KLController, PPOLoss, PPORollouts
    from lmlab.align.reward_model import RewardScorer
    from lmlab.model.checkpoint import load_pretrained

    if not ac.reward_model:
        raise LmlabError("PPO needs a reward model: set align.reward_model (a `lmlab align rm` output)",
                         file=recipe.source, field="align.reward_model")  # fmt: skip
    scorer = RewardScorer.load(ac.reward_model)
    paths = data_paths(recipe, "prompts")
    policy, tok = load_policy(recipe, ac)
    # the value model starts from the reward model (InstructGPT): one score per token instead of per sequence
    value, _ = load_pretrained(ac.value_model or ac.reward_model, head="token_cls", num_labels=1, labels=["value"])
    model = ActorCritic(policy, value)
    cfg = recipe.train
    out = Path(cfg.out_dir)
    loss = PPOLoss(ac.cliprange, ac.cliprange_value, ac.vf_coef, ac.temperature)
    data = PPORollouts(read_prompts(paths["train"]), tok, _rows(recipe), minibatches=ac.minibatches,
                       epochs=ac.epochs, generation=_generation(ac), seed=cfg.seed, metrics=loss.metrics,
                       scorer=scorer, kl=KLController(ac.kl_coef, ac.kl_target, ac.kl_horizon),
                       kl_estimator=ac.kl_estimator, gamma=ac.gamma, lam=ac.lam, temperature=ac.temperature,
                       whiten_advantages=ac.whiten_advantages)  # fmt: skip
    trainer = _trainer(recipe, model, data, loss, tok, progress=progress)
    data.set_policy(trainer.raw)
    summary: dict[str, Any] = {"method": "ppo", "kl_coef": ac.kl_coef, "kl_target": ac.kl_target}
    prompts = _eval_prompts(recipe, ac, paths)
    if not resume:
        summary["before"] = _measure(trainer, tok, prompts, ac, scorer)
    summary["train"] = trainer.fit(resume=resume)
    summary["after"] = _measure(trainer, tok, prompts, ac, scorer)
    return _finish(summary, trainer, out)


def align(recipe: Recipe, resume: bool = False, progress: bool = True, method: str | None = None) -> dict[str, Any]:
    """Run an alignment recipe end to end (`method` overrides align.method, as the CLI's subcommand does)."""
    if method is not None:
        if recipe.align.get("method") not in (None, method):
            raise LmlabError(f"the recipe says method {recipe.align['method']!r}, the command {method!r}",
                             file=recipe.source, field="align.method")  # fmt: skip
        recipe.align = {**recipe.align, "method": method}
    ac = align_config(recipe)
    run = {"rm": run_rm, "dpo": run_dpo, "ppo": run_ppo, "grpo": run_grpo}[ac.method]
    return run(recipe, ac, resume=resume, progress=progress)


def demo(recipe: str | os.PathLike = "recipes/align/demo.yaml", progress: bool = True) -> dict[str, Any]:
    """`make demo`'s alignment stage: a few DPO steps; returns the summary (`report` holds the printed text:
    held-out reward accuracy and margin, and the same questions answered before and after)."""
    from lmlab.align.report import format_summary
    from lmlab.train.config import load_recipe

    summary = align(load_recipe(recipe), progress=progress)
    summary["report"] = format_summary(summary)
    return summary
