"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay."""

from __future__ import annotations

import math

from lmlab.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # hold the peak, then decay linearly over the last decay_fraction of training
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(frac, 1.0)
    frac = min((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))  # cosine


class Plateau:
    """Reduce-on-plateau on top of the schedule: scale the lr down when validation loss stalls."""

    def __init__(self, patience: int, factor: float, min_delta: float = 0.0) -> None:
        self.patience, self.factor, self.min_delta = patience, factor, min_delta
        self.best, self.bad, self.scale = math.inf, 0, 1.0

    def observe(self, val_loss: float) -> None:
        """Record one evaluation."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad = val_loss, 0
        elif self.patience > 0:
            self.bad += 1
            if self.bad >= self.patience:
                self.scale *= self.factor
                self.bad = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "scale": self.scale}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.bad, self.scale = d["best"], d["bad"], d["scale"]
