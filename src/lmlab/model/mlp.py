"""The position-wise feed-forward network: a GELU MLP (GPT-2, BERT) or SwiGLU (LLaMA, Qwen)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.kernels import fused
from lmlab.model.config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """down(act(up(x))), or with SwiGLU down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        d_ff = cfg.ff(layer)  # per layer once structured pruning removed neurons
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias) if cfg.mlp == "swiglu" else None
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            g, u = self.gate(x), self.up(x)
            # one C++ pass each way (kernels/fused.py); bf16 too, as autocast's linears give it
            if self.act is F.silu and g.dtype == u.dtype and fused.applies(g, u, dtypes=fused.SWIGLU_DTYPES):
                return self.down(fused.swiglu(g, u))
            return self.down(self.act(g) * u)
        return self.down(self.act(self.up(x)))
