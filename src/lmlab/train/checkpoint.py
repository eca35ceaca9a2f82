"""Training checkpoints: a Hugging Face model directory plus everything needed to continue exactly.

step-000100/
  config.json, model.safetensors, tokenizer files   (load_pretrained and transformers read these)
  trainer_state.pt   optimizer, schedule state, step, RNG states, data position (loaded weights_only)
  recipe.yaml        the resolved recipe
A checkpoint is written into a temporary folder and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from lmlab.errors import LmlabError
from lmlab.model.checkpoint import save_state
from lmlab.model.config import ModelConfig
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.atomic import atomic_dir

STATE_FILE = "trainer_state.pt"


def write_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None,
    state: dict[str, Any],
    recipe: dict[str, Any] | None,
    write_weights: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
) -> Path:
    """Write one checkpoint folder atomically (temp folder beside it, then rename).

    write_weights replaces the model directory's weights (a LoRA run writes only its adapter).
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if write_weights is None:
            save_state(cfg, params, tokenizer, tmp)
        else:
            write_weights(params, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(
                yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8"
            )
    return directory


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain data only: never unpickles code)."""
    file = Path(directory) / STATE_FILE
    if not file.exists():
        raise LmlabError("not a training checkpoint (no trainer_state.pt)", file=str(directory))
    return torch.load(file, map_location="cpu", weights_only=True)


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under root/checkpoints, oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.exists():
        return []
    dirs = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (the best one lives elsewhere)."""
    for old in step_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
