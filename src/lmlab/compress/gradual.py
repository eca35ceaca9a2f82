"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune").

Sparsity rises from s_i to s_f over n pruning steps spaced dt apart, starting at step t0:

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3     for t = t0, t0 + dt, ..., t0 + n * dt

fast at first, while many redundant weights remain, then slower, so the network can recover. At
each pruning step the smallest-magnitude weights go; between them the masks are re-applied after
every optimizer step so pruned weights stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lmlab.compress.magnitude import magnitude_scores
from lmlab.compress.sparsity import (
    Masks,
    apply_masks,
    check_sparsity,
    masks_from_scores,
    masks_from_zeros,
    weight_masks,
)
from lmlab.errors import LmlabError
from lmlab.train.config import section_config
from lmlab.train.trainer import Callback, Trainer


@dataclass
class PruneConfig:
    """The `prune:` section of a pretraining or fine-tuning recipe."""

    final_sparsity: float = 0.5  # s_f
    initial_sparsity: float = 0.0  # s_i
    start_step: int = 0  # t0
    every: int = 10  # dt: steps between mask updates
    updates: int = 10  # n: mask updates after the first, so s_f is reached at t0 + n * dt
    scope: str = "layer"  # layer, row or global (see sparsity.masks_from_scores)
    keep_zeros: bool = True  # weights already zero in the starting checkpoint stay pruned

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "prune.final_sparsity")
        check_sparsity(self.initial_sparsity, "prune.initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise LmlabError("initial_sparsity is above final_sparsity", field="prune.initial_sparsity")
        for name in ("start_step", "every", "updates"):
            if getattr(self, name) < (0 if name == "start_step" else 1):
                raise LmlabError(f"{getattr(self, name)!r} is too small", field=f"prune.{name}")

    @property
    def end_step(self) -> int:
        """The step at which the final sparsity is reached."""
        return self.start_step + self.updates * self.every


def prune_config(section: dict[str, Any], source: str | None = None) -> PruneConfig:
    """A recipe's `prune:` section, validated (unknown keys named, YAML text turned into numbers)."""
    return section_config(PruneConfig, section, "prune", source)


def cubic_sparsity(step: int, cfg: PruneConfig) -> float:
    """Zhu & Gupta's s_t at optimizer step `step` (0 before t0, s_f after t0 + n * dt)."""
    if step < cfg.start_step:
        return 0.0
    frac = min((step - cfg.start_step) / (cfg.updates * cfg.every), 1.0)
    return cfg.final_sparsity + (cfg.initial_sparsity - cfg.final_sparsity) * (1 - frac) ** 3


def is_update_step(step: int, cfg: PruneConfig) -> bool:
    """Whether the masks are recomputed after optimizer step `step`."""
    return cfg.start_step <= step <= cfg.end_step and (step - cfg.start_step) % cfg.every == 0


class GradualPruning(Callback):
    """A Trainer callback: at scheduled steps prune to s_t by magnitude; after every step re-apply masks."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        self.masks: Masks = {}
        self.history: list[tuple[int, float]] = []  # (step, target sparsity) of each mask update

    def start(self, model: nn.Module, step: int = 0) -> None:
        """Take the masks the model implies (a pruned checkpoint's zeros stay zero); prune if t0 is now."""
        # a resumed run (past t0): the zeros already hold the last masks
        keep = self.cfg.keep_zeros or step > self.cfg.start_step
        self.masks = weight_masks(model, masks_from_zeros(model)) if keep else {}
        if is_update_step(step, self.cfg):
            self._update(model, step)

    def _update(self, model: nn.Module, step: int) -> None:
        s = cubic_sparsity(step, self.cfg)
        scores = magnitude_scores(model)
        for name, mask in self.masks.items():
            scores[name] = scores[name] * mask.to(scores[name].device)  # pruned weights score 0: masks only grow
        self.masks = weight_masks(model, masks_from_scores(scores, s, self.cfg.scope))
        apply_masks(model, self.masks)
        self.history.append((step, s))

    def on_train_begin(self, trainer: Trainer) -> None:
        self.start(trainer.raw, trainer.state.step)

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if is_update_step(step, self.cfg):
            self._update(trainer.raw, step)
        elif self.masks:
            apply_masks(trainer.raw, self.masks)


def recipe_callbacks(recipe: Any) -> list[Callback]:
    """The Trainer callbacks a recipe's `prune:` section asks for (none without one)."""
    if not getattr(recipe, "prune", None):
        return []
    return [GradualPruning(prune_config(recipe.prune, recipe.source))]
