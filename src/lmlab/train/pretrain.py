"""Pretraining from a recipe: prepare data if needed, build the model, run the Trainer, show samples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lmlab.data.shards import shards_tokenizer
from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer, load_tokenizer
from lmlab.train.config import Recipe, coerce
from lmlab.train.trainer import Callback, Trainer

SAMPLE_PROMPTS = ["ROMEO:", "First Citizen:\n", "中国", "The "]


def prepare_tokens(data: dict[str, Any], progress: bool = True) -> Path:
    """The token-shard folder of a recipe, built from its sources (fetch -> clean -> tokenizer -> tokenize)
    unless `data.tokens` already holds one."""
    from lmlab.data import clean, fetch, tokenize_files
    from lmlab.tokenizer.train import train_tokenizer_files

    if "tokens" not in data:
        raise LmlabError("the recipe needs data.tokens (a folder made by `lmlab data tokenize`)", field="data.tokens")
    tokens = Path(data["tokens"])
    if (tokens / "meta.json").exists():
        return tokens
    sources = data.get("sources")
    if not sources:
        raise LmlabError(f"{tokens} has no meta.json and the recipe lists no data.sources to build it from",
                         field="data.sources")  # fmt: skip
    work = Path(data.get("work_dir", tokens.parent / "prepared"))
    folders = [Path(fetch(name)) for name in sources]  # tokenize_files makes its own validation split
    splits = [folder / split for folder in folders for split in ("train.jsonl", "validation.jsonl")]
    clean([str(p) for p in splits if p.exists()], work / "clean", data.get("clean_config"), progress=progress)
    tok_dir = Path(data.get("tokenizer", work / "tokenizer"))
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer_files([work / "clean"], int(data.get("vocab_size", 8192)), tok_dir, progress=progress)
    tokenize_files(
        tok_dir, [work / "clean"], tokens, val_fraction=float(data.get("val_fraction", 0.02)), progress=progress
    )
    return tokens


def build_model(recipe: Recipe, tokenizer: Tokenizer, vocab_size: int) -> Transformer:
    """A fresh model from `model.preset` + overrides, or a checkpoint from `model.init_from` (continued pretraining)."""
    spec = dict(recipe.model)
    if "init_from" in spec:
        from lmlab.model.checkpoint import load_pretrained

        return load_pretrained(spec["init_from"])[0]
    preset = spec.pop("preset", "llama-10m")
    spec = coerce(ModelConfig, spec, "model", recipe.source)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    cfg = ModelConfig.from_preset(preset, **{"vocab_size": vocab_size, **ids, **spec})
    if cfg.max_seq_len < recipe.train.block_size:
        cfg.max_seq_len = recipe.train.block_size
    torch.manual_seed(recipe.train.seed)
    return Transformer(cfg)


def samples(model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Seeded samples (temperature 0.8, top-k 50) that show what the model learned."""
    from lmlab.generate import generate

    model.eval()
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0)
    return [p + g.text for p, g in zip(prompts, outs)]


def pretrain(
    recipe: Recipe, resume: bool = False, progress: bool = True, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Run a pretraining recipe end to end; returns the Trainer's summary plus samples before and after.

    callbacks: told every step; a `prune:` section needs lmlab.compress.gradual.recipe_callbacks(recipe)
    (compress sits above train, so the pruning callback is passed in rather than built here).
    """
    from lmlab.data import TokenDataset

    if recipe.prune and not callbacks:
        raise LmlabError("the recipe has a prune: section but no pruning callback was passed", file=recipe.source,
                         field="prune", hint="pass callbacks=lmlab.compress.gradual.recipe_callbacks(recipe)")  # fmt: skip
    cfg = recipe.train
    tokens = prepare_tokens(recipe.data, progress)
    meta = TokenDataset(tokens, "train", block_size=cfg.block_size, batch_size=1).meta
    tokenizer = load_tokenizer(shards_tokenizer(tokens, meta))
    model = build_model(recipe, tokenizer, meta["vocab_size"])
    world = int(os.environ.get("WORLD_SIZE", 1))
    rows = cfg.micro_batch_size * cfg.grad_accum * world
    train = TokenDataset(tokens, "train", block_size=cfg.block_size, batch_size=rows, mode="random", seed=cfg.seed)
    val = TokenDataset(tokens, "val", block_size=cfg.block_size, batch_size=cfg.micro_batch_size * world,
                       mode="sequential")  # fmt: skip
    total_tokens = sum(s["tokens"] for s in meta["splits"].values())
    bytes_per_token = meta.get("input_bytes", 0) / total_tokens if total_tokens else None
    prompts = recipe.data.get("sample_prompts", SAMPLE_PROMPTS)
    before = samples(model, tokenizer, prompts) if not resume else []
    trainer = Trainer(model, train, cfg, val_data=val, tokenizer=tokenizer, recipe=recipe.to_dict(),
                      bytes_per_token=bytes_per_token, progress=progress, callbacks=callbacks)  # fmt: skip
    summary = trainer.fit(resume=resume)
    summary["samples_before"] = before
    summary["samples_after"] = samples(trainer.raw, tokenizer, prompts) if trainer.dist.main else []
    summary["out_dir"] = str(trainer.out)
    return summary
