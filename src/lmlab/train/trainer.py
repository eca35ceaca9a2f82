"""The Trainer: one loop for pretraining, fine-tuning and alignment; they differ only in `loss_fn`.

A step: take the global batch for this step, keep this process's share, split it into
micro-batches; forward, loss, backward for each (gradients accumulate); clip; optimizer step;
schedule. Around it: evaluation, early stopping, checkpoints, a NaN guard, logs and plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.train import checkpoint as ckpt
from lmlab.train import distributed
from lmlab.train.config import TrainConfig
from lmlab.train.flops import batch_counts, step_flops
from lmlab.train.objectives import causal_lm_loss
from lmlab.train.optim import build_optimizer, penalty
from lmlab.train.schedule import Plateau, lr_at
from lmlab.utils.device import policy
from lmlab.utils.flops import measure_matmul_flops
from lmlab.utils.progress import progress_bar

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]
LOWER_IS_BETTER = ("loss", "ppl", "bpb", "ece", "error")


class Callback:
    """Something the Trainer tells before training and after every optimizer step (pruning masks)."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called once by fit(), after any resume, before the first step."""

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after each optimizer step; trainer.state.step counts the steps done."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of this metric is better (losses, perplexity, bits per byte, calibration error)."""
    return metric.endswith(LOWER_IS_BETTER)


def split_batch(batch: Batch, parts: int, index: int) -> Batch:
    """Part `index` of `parts` equal slices along the batch dimension (tuples, dicts and tensors)."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0] // parts
        return batch[index * n : (index + 1) * n]
    if isinstance(batch, dict):
        return {k: split_batch(v, parts, index) for k, v in batch.items()}
    return type(batch)(split_batch(v, parts, index) for v in batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch."""
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        if policy(device).pin_memory and batch.device.type == "cpu":
            batch = batch.pin_memory()  # a pinned source lets the copy run without blocking the host
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


def _batch_rows(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return _batch_rows(first)


@dataclass
class TrainState:
    """Counters that a checkpoint carries."""

    step: int = 0  # optimizer steps done
    tokens: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    nan_streak: int = 0
    skipped: int = 0


class Trainer:
    """Train `model` on batches from `train_data.get_batch(step)` (the global batch of that step)."""

    def __init__(
        self,
        model: Transformer,
        train_data: Any,
        config: TrainConfig,
        *,
        val_data: Any | None = None,
        tokenizer: Tokenizer | None = None,
        loss_fn: LossFn | None = None,
        recipe: dict[str, Any] | None = None,
        bytes_per_token: float | None = None,
        device: str | None = None,
        progress: bool = True,
        eval_fn: EvalFn | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        """eval_fn(model) adds metrics (accuracy, F1, ...) to each evaluation; on_eval(step, metrics) is
        told every evaluation (a hyperparameter search prunes trials from it); callbacks hear every step."""
        self.callbacks = list(callbacks or [])
        self.cfg, self.train_data, self.val_data = config, train_data, val_data
        self.tokenizer, self.recipe, self.bytes_per_token = tokenizer, recipe, bytes_per_token
        self.eval_fn, self.on_eval = eval_fn, on_eval
        self.dist = distributed.setup(device or config.device)
        self.raw = model.to(self.dist.device)  # the unwrapped model: what checkpoints hold
        self.model = distributed.wrap(self.raw, self.dist, config.strategy)
        if config.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.raw, config)
        # on a GPU the step never waits for the device: only optimizers that can skip an update on the
        # device (fused AdamW reads found_inf) allow it; elsewhere the step checks the loss on the host
        self._deferred = not policy(self.dist.device).sync_every_step and getattr(
            self.optimizer, "_step_supports_amp_scaling", False
        )
        self._dev_skipped = torch.zeros((), dtype=torch.long, device=self.dist.device)
        self._dev_streak = torch.zeros((), dtype=torch.long, device=self.dist.device)
        self.plateau = Plateau(config.plateau_patience, config.plateau_factor, config.early_stopping_min_delta)
        self.state = TrainState()
        smoothing = config.label_smoothing
        self.loss_fn = loss_fn or (lambda m, b: causal_lm_loss(m, b[0], b[1], label_smoothing=smoothing))
        self.out = Path(config.out_dir)
        self.progress = progress and self.dist.main
        self.log_file = self.out / "metrics.jsonl"
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._writer = None

    # -- the step -----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")

    def global_batch_size(self) -> int:
        """Rows per optimizer step, over all processes and micro-batches."""
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.dist.world

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on one global batch, then the callbacks; returns loss, grad norm, lr."""
        info = self._step(batch)
        for cb in self.callbacks:
            cb.on_step_end(self)
        return info

    def _step(self, batch: Batch) -> dict[str, float]:
        cfg, d = self.cfg, self.dist
        if _batch_rows(batch) != self.global_batch_size():
            raise LmlabError(
                f"the data gives {_batch_rows(batch)} rows per step, the config asks for "
                f"{self.global_batch_size()} (micro_batch_size x grad_accum x processes)",
                field="train.micro_batch_size",
            )
        mine = split_batch(batch, d.world, d.rank)
        lr = lr_at(self.state.step, cfg) * self.plateau.scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=d.device)
        for i in range(cfg.grad_accum):
            micro = to_device(split_batch(mine, cfg.grad_accum, i), d.device)
            last = i == cfg.grad_accum - 1
            # DDP: average gradients across processes only after the last micro-batch
            skip_sync = d.world > 1 and not last and hasattr(self.model, "no_sync")
            sync = self.model.no_sync() if skip_sync else contextlib.nullcontext()
            with sync, self._autocast():
                loss = self.loss_fn(self.model, micro)
                extra = penalty(self.raw, cfg.l1, cfg.l2)
                if extra is not None:
                    loss = loss + extra
            (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        total = distributed.all_mean(total, d)
        if self._deferred:
            return self._finish_step_on_device(total, lr)
        if not torch.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nan_streak += 1
            self.state.skipped += 1
            self._check_nan_streak()
            self.state.step += 1
            return {"loss": float(total), "lr": lr, "skipped": True}
        self.state.nan_streak = 0
        grad_norm = float("nan")
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return {"loss": float(total), "lr": lr, "grad_norm": grad_norm}

    def _finish_step_on_device(self, total: torch.Tensor, lr: float) -> dict[str, Any]:
        """The GPU's step end: no host sync. A non-finite loss skips the update inside the fused optimizer
        (found_inf, as GradScaler uses it), and the skip counters stay on the device until `sync_counters`.
        Loss and grad norm come back as 0-dim tensors, read only when logged."""
        finite = torch.isfinite(total)
        grad_norm = torch.full((), float("nan"), device=total.device)
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.optimizer.found_inf = (~finite).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        bad = (~finite).long()
        self._dev_skipped += bad
        self._dev_streak = (self._dev_streak + 1) * bad
        self.state.step += 1
        return {"loss": total, "lr": lr, "grad_norm": grad_norm}

    def sync_counters(self) -> None:
        """Bring the device-side skip counters to the host (at logs, evaluations and checkpoints)."""
        if not self._deferred:
            return
        skipped, streak = (int(v) for v in torch.stack([self._dev_skipped, self._dev_streak]).tolist())
        self.state.skipped += skipped
        self.state.nan_streak = streak
        self._dev_skipped.zero_()
        self._check_nan_streak()

    def _check_nan_streak(self) -> None:
        if self.state.nan_streak >= self.cfg.nan_patience:
            raise LmlabError(
                f"loss was not finite for {self.state.nan_streak} steps in a row (last at step {self.state.step})",
                hint="lower train.lr, check the data, or use float32",
            )

    def step_flops(self, batch: Batch) -> int:
        """The model FLOPs one step over `batch` does (forward, and backward only where something trains)."""
        if not hasattr(self.raw, "layers"):  # not an lmlab Transformer: the 6 x parameters x tokens rule
            return 6 * sum(p.numel() for p in self.raw.parameters()) * _input_ids(batch).numel()
        return step_flops(self.raw, batch_counts(self.raw, batch))

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and, when bytes per token are known, bits per byte;
        plus whatever the evaluation function measures."""
        if self.val_data is None:
            return {}
        self.model.eval()
        losses = []
        batches = self.cfg.eval_batches
        if hasattr(self.val_data, "steps_per_epoch"):  # a finite set: one pass, not more
            batches = min(batches, self.val_data.steps_per_epoch)
        for i in range(batches):
            batch = self.val_data.get_batch(i)
            mine = to_device(split_batch(batch, self.dist.world, self.dist.rank), self.dist.device)
            with self._autocast():
                losses.append(self.loss_fn(self.model, mine).float())
        val = float(distributed.all_mean(torch.stack(losses).mean(), self.dist))
        out = {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
        if self.bytes_per_token:
            out["val_bpb"] = val / math.log(2) / self.bytes_per_token
        if self.eval_fn is not None:
            with self._autocast():
                out.update(self.eval_fn(self.raw))
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = get_model_state_dict(self.raw, options=opts)
        optim = get_optimizer_state_dict(self.raw, self.optimizer, options=opts)
        return params, optim

    def save(self, directory: Path) -> Path | None:
        """Write a checkpoint of the current step (every process joins the gather; the main one writes)."""
        self.sync_counters()
        params, optim = self._full_state()
        if not self.dist.main:
            return None
        state = {
            "train": asdict(self.state),
            "optimizer": optim,
            "plateau": self.plateau.state_dict(),
            "rng": {"torch": torch.get_rng_state(), **_cuda_rng()},
            "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else {},
            "world": self.dist.world,
        }
        adapter = getattr(self.raw, "adapter", None)
        writer = None
        if adapter is not None:  # a LoRA run saves its adapter, not another copy of the frozen base
            params = {n: t for n, t in params.items() if adapter.owns(n)}
            writer = lambda p, d: adapter.write(self.raw, p, d)
        return ckpt.write_checkpoint(
            directory, self.raw.cfg, params, self.tokenizer, state, self.recipe, write_weights=writer
        )

    def resume(self, directory: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, counters, RNG and data position."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from lmlab.model.checkpoint import load_pretrained

        state = ckpt.read_state(directory)
        adapter = getattr(self.raw, "adapter", None)
        if adapter is not None:
            weights = adapter.read(self.raw, Path(directory))
            opts = StateDictOptions(full_state_dict=True, strict=False)
        else:
            weights = dict(load_pretrained(directory)[0].state_dict())
            opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.raw, weights, options=opts)
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.raw, self.optimizer, optim_state_dict=state["optimizer"], options=opts)
        self.state = TrainState(**state["train"])
        self.plateau.load_state_dict(state["plateau"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available() and state.get("world") == self.dist.world:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if hasattr(self.train_data, "load_state_dict") and state.get("data"):
            self.train_data.load_state_dict(state["data"])

    # -- logging ------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, record["step"])

    def records(self) -> list[dict]:
        """Every record of this run's metrics log."""
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: str | Path | bool | None = None) -> dict[str, Any]:
        """Train until max_steps or early stopping; returns a summary (final and best validation loss, ...)."""
        cfg, d = self.cfg, self.dist
        if resume:
            path = ckpt.latest(self.out) if resume is True else Path(resume)
            if path is None:
                raise LmlabError("nothing to resume: no checkpoint under", file=str(self.out / "checkpoints"))
            self.resume(path)
        elif d.main and self.log_file.exists():
            self.log_file.unlink()  # a fresh run starts a fresh log
        if cfg.tensorboard and d.main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        if not resume:  # dropout draws from here; a resumed run restores the saved RNG state instead
            torch.manual_seed(cfg.seed + d.rank)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        peak = measure_matmul_flops(d.device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32) * d.world
        bar = progress_bar(total=cfg.max_steps, initial=self.state.step, disable=not self.progress, unit="step")
        stopped_early, t_last = False, time.perf_counter()
        window_tokens = window_flops = 0
        every_ckpt = cfg.checkpoint_every or cfg.eval_every
        while self.state.step < cfg.max_steps:
            batch = self.train_data.get_batch(self.state.step)
            info = self.train_step(batch)
            # tokens this step really ran (fine-tuning batches are padded to their own length)
            ids = _input_ids(batch)
            step_tokens = ids.numel()
            self.state.tokens += step_tokens
            window_tokens += step_tokens
            window_flops += self.step_flops(batch)
            step = self.state.step
            if step % cfg.log_every == 0 or step == cfg.max_steps or info.get("skipped"):
                self.sync_counters()
                info = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in info.items()}
                dt = time.perf_counter() - t_last
                rate = window_tokens / max(dt, 1e-9)
                mfu = window_flops / max(dt, 1e-9) / peak
                window_tokens = window_flops = 0
                t_last = time.perf_counter()
                record = {"step": step, **info, "tokens_per_s": rate, "mfu": mfu, "tokens": self.state.tokens}
                if hasattr(self.loss_fn, "log_metrics"):  # an aligner's own means (rewards, KL, margins)
                    record.update(self.loss_fn.log_metrics(d))
                self._log(record)
                bar.set_postfix(
                    loss=f"{info['loss']:.3f}", lr=f"{info['lr']:.2e}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.0%}"
                )
            bar.update(1)
            if self.val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                self.sync_counters()
                metrics = self.evaluate()
                self._log({"step": step, **metrics})
                if self.progress:
                    shown = {k: round(v, 4) for k, v in metrics.items() if k != "val_ppl"}
                    tqdm.write(f"step {step}: {shown}")
                self.plateau.observe(metrics["val_loss"])
                key = cfg.early_stopping_metric
                if key not in metrics:
                    raise LmlabError(f"evaluation has no {key!r}; it has {', '.join(metrics)}",
                                     field="train.early_stopping_metric")  # fmt: skip
                # state.best_val holds the metric signed so that lower is better
                value = metrics[key] if lower_is_better(key) else -metrics[key]
                improved = value < self.state.best_val - cfg.early_stopping_min_delta
                if improved:
                    self.state.best_val, self.state.best_step, self.state.bad_evals = value, step, 0
                    # frozen weights cannot change: keep only what trains
                    self._best_weights = {
                        k: v.detach().clone() for k, v in self.raw.named_parameters() if v.requires_grad
                    }
                    if cfg.save_checkpoints:
                        self.save(self.out / "best")
                else:
                    self.state.bad_evals += 1
                if self.on_eval is not None:
                    self.on_eval(step, metrics)
                if cfg.early_stopping_patience and self.state.bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
            if cfg.save_checkpoints and (step % every_ckpt == 0 or stopped_early or step == cfg.max_steps):
                self.save(self.out / "checkpoints" / f"step-{step:06d}")
                if d.main:
                    ckpt.prune(self.out, cfg.keep_last)
                distributed.barrier(d)
            if stopped_early:
                break
        bar.close()
        self.sync_counters()
        if stopped_early and self._best_weights is not None:
            # early stopping returns the best model, not the last
            self.raw.load_state_dict(self._best_weights, strict=False)
        key = cfg.early_stopping_metric
        best = None
        if self.val_data is not None and math.isfinite(self.state.best_val):
            best = self.state.best_val if lower_is_better(key) else -self.state.best_val
        summary = {
            "steps": self.state.step,
            "stopped_early": stopped_early,
            "best_val_loss": best if key == "val_loss" else None,
            "best_metric": key,
            "best_value": best,
            "best_step": self.state.best_step,
            "skipped_steps": self.state.skipped,
            "tokens": self.state.tokens,
        }
        if cfg.save_checkpoints:
            self.save(self.out / "final")
        if d.main:
            records = self.records()
            if records:
                from lmlab.viz.curves import plot_training_curves

                summary["plot"] = str(plot_training_curves(records, self.out / "curves.png"))
        if self._writer is not None:
            self._writer.close()
        return summary


def _input_ids(batch: Batch) -> torch.Tensor:
    """The token ids of a batch: a tensor, the first of a tuple, or a dict's input_ids."""
    if isinstance(batch, dict):
        return batch["input_ids"]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _cuda_rng() -> dict[str, Any]:
    return {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
