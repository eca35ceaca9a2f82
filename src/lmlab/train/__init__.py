"""Training: one Trainer for pretraining, fine-tuning and alignment, on PyTorch's own distributed engine."""

from lmlab.train.config import Recipe, TrainConfig, load_recipe
from lmlab.train.trainer import Trainer

__all__ = ["Recipe", "TrainConfig", "Trainer", "load_recipe"]
