"""The reference policy: what the KL penalty and DPO's implicit reward measure against.

With LoRA the reference is the policy itself with its adapters switched off (no second copy); with full
fine-tuning it is a frozen copy, loaded only when an online method needs it at every step (PPO, GRPO
with beta > 0). DPO needs reference log-probs only of its fixed pairs: they are computed once before
training and cached to disk (`pair_reference`), so no second model is ever held.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmlab.align.data import PairDataset
from lmlab.align.logprobs import completion_logprobs, pair_logprobs
from lmlab.finetune.lora import adapters_disabled
from lmlab.train import distributed
from lmlab.utils.atomic import atomic_path


def has_adapter(model: nn.Module) -> bool:
    """True when the model carries a LoRA adapter."""
    return getattr(model, "adapter", None) is not None


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """The block runs the reference: the base with adapters off (LoRA), else the model as it is now."""
    ctx = adapters_disabled(model) if has_adapter(model) else contextlib.nullcontext()
    was = model.training
    model.eval()  # no dropout: the reference is deterministic
    try:
        with ctx, torch.no_grad():
            yield model
    finally:
        model.train(was)


@torch.no_grad()
def pair_logps(model: nn.Module, data: PairDataset, batch_size: int = 8) -> torch.Tensor:
    """(N, 2) summed completion log-probs of every pair's (chosen, rejected) under `model` as it runs now."""
    device = next(model.parameters()).device
    out = torch.zeros(len(data), 2)
    for idx, batch in data.batches(batch_size):
        ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
        out[idx] = pair_logprobs(model, ids, attn, comp).float().cpu()  # as DPOLoss scores them
    return out


def pair_reference(
    model: nn.Module,
    data: PairDataset,
    path: str | os.PathLike,
    batch_size: int = 8,
    dist: distributed.Dist | None = None,
) -> torch.Tensor:
    """The reference log-probs of a pair set, read from `path` when it holds them for this very data, else
    computed (main process), written atomically, and read by every process. Attaches them to `data`."""
    path = Path(path)
    fingerprint = data.fingerprint()
    ref = _read_cache(path, fingerprint)
    if ref is None:
        if dist is None or dist.main:
            with as_reference(model):
                ref = pair_logps(model, data, batch_size)
            with atomic_path(path) as tmp:
                save_file({"ref_logps": ref.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
        if dist is not None:
            distributed.barrier(dist)
        ref = _read_cache(path, fingerprint)
    data.set_reference(ref)
    return ref


def _read_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None  # another data set's cache: recompute
        return f.get_tensor("ref_logps")


class OnlineReference:
    """Reference log-probs of fresh rollouts: adapters off on the policy (LoRA), else a frozen copy."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.frozen = None
        if not has_adapter(policy):
            self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """Per-token reference log-probs (B, T), 0 outside the completion, at the temperature the policy's are
        taken at (else KL(policy || reference) is not 0 at the start: TRL divides both by it too)."""
        model = self.frozen if self.frozen is not None else self.policy
        with as_reference(model):
            return completion_logprobs(model, input_ids, attention_mask, completion_mask, temperature=temperature)[0]
