"""Running means of an aligner's own quantities (rewards, KL, margins, entropy) between two log rows.

The loss function and the rollout add values as they compute them; the Trainer asks `log_metrics` when
it writes a row of metrics.jsonl, which averages over the micro-batches, steps and processes since the
last row. Values recorded while the model is in eval mode (the Trainer's validation pass) are ignored.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lmlab.train import distributed


class StepMetrics:
    """Sums and counts per key, kept on the device until a row is written (no host sync per micro-batch)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, **values: torch.Tensor | float) -> None:
        """Record one value per key (a tensor is detached and averaged first)."""
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v
            self.counts[k] += 1

    def pop(self, dist: distributed.Dist | None = None) -> dict[str, float]:
        """The means since the last call, averaged over processes; resets."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        device = dist.device if dist is not None else "cpu"
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) / self.counts[k]
                             for k in keys])  # fmt: skip
        if dist is not None:
            means = distributed.all_mean(means, dist)
        self.sums.clear()
        self.counts.clear()
        return dict(zip(keys, means.tolist()))


class AlignLoss:
    """Base of the aligners' loss functions: a callable (model, batch) -> loss with a metrics log."""

    def __init__(self) -> None:
        self.metrics = StepMetrics()

    def record(self, model: torch.nn.Module, **values: torch.Tensor | float) -> None:
        """Log values of a training micro-batch (not of the validation pass)."""
        if model.training:
            self.metrics.add(**values)

    def log_metrics(self, dist: distributed.Dist | None = None) -> dict[str, float]:
        """The Trainer's hook: this loss's means since its last log row."""
        return self.metrics.pop(dist)
