"""Normalization layers: LayerNorm (GPT-2, BERT) and RMSNorm (LLaMA, Qwen, Mistral)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.kernels import fused
from lmlab.model.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like the reference implementations."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            if fused.applies(x, self.weight):  # one C++ pass forward and backward (kernels/fused.py)
                return fused.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel, weight included
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer `cfg` asks for."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
