"""Training curves: loss (train and validation) and learning rate against steps, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.viz.figure import pyplot, save_png


def plot_training_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Plot records from a metrics log (dicts with step and loss / val_loss / lr) to a PNG."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax1.plot(*zip(*val), "o-", label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.set_title(title or "loss")
    if lr:
        ax2.plot(*zip(*lr))
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("schedule")
    fig.tight_layout()
    return save_png(fig, path)
