"""Rotary position embeddings (RoPE) and their context-extension scalings.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query/key by an angle pos * inv_freq_i, so the
dot product q.k depends only on the distance between positions. Scalings stretch the angles so
a model trained on L tokens reads longer inputs:
- linear (position interpolation): angles / factor;
- ntk (NTK-aware): a larger base, which stretches low frequencies and keeps high ones;
- dynamic (dynamic NTK): the ntk base chosen from the current length, only past max_seq_len;
- llama3: low frequencies / factor, high ones unchanged, a smooth ramp between.
"""

from __future__ import annotations

import math

import torch

from lmlab.kernels import fused
from lmlab.model.config import ModelConfig


def _inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) for `cfg`; `seq_len` matters only for dynamic scaling."""
    dim, base = cfg.head_dim, cfg.rope_theta
    sc = cfg.rope_scaling or {}
    kind, factor = sc.get("type"), float(sc.get("factor", 1.0))
    if kind == "linear":
        return _inv_freq(base, dim) / factor
    if kind == "ntk":
        return _inv_freq(base * factor ** (dim / (dim - 2)), dim)
    if kind == "dynamic":
        original = cfg.max_seq_len
        seq_len = max(seq_len or original, original)
        return _inv_freq(base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2)), dim)
    if kind == "llama3":
        inv_freq = _inv_freq(base, dim)
        original = sc.get("original_max_position_embeddings", 8192)
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)
    return _inv_freq(base, dim)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) for given positions; caches a table unless scaling is dynamic."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dynamic = (cfg.rope_scaling or {}).get("type") == "dynamic"
        self.reset()

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the inverse frequencies and drop the cached table."""
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg).to(device), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.dynamic:
            # built now, not at the first call: a table that appears during a torch.compile'd call
            # fails that graph's guards and makes the second call compile the model again
            self._table = self._cos_sin(self._positions(0, self.inv_freq.device), self.inv_freq)

    def _positions(self, need: int, device: torch.device) -> torch.Tensor:
        return torch.arange(max(need, min(self.cfg.max_seq_len, 8192)), device=device, dtype=torch.float32)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, max_pos: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of shape (B, 1, T, head_dim) for position_ids (B, T); see apply_rope.

        max_pos, when the caller knows it, bounds the positions without reading them back from the
        device (a sync, and a graph break under torch.compile).
        """
        if max_pos is None:
            max_pos = int(position_ids.max()) if position_ids.numel() else 0
        if self.dynamic:
            # the base follows the longest position in this call, as in Hugging Face's dynamic NTK
            inv_freq = rope_inv_freq(self.cfg, int(position_ids.max()) + 1).to(position_ids.device)
            cos, sin = self._cos_sin(position_ids.float(), inv_freq)
        else:
            need = max_pos + 1
            table = self._table
            if table is None or table[0].shape[0] < need or table[0].device != position_ids.device:
                pos = self._positions(need, position_ids.device)
                table = self._table = self._cos_sin(pos, self.inv_freq.to(position_ids.device))
            cos, sin = table[0][position_ids], table[1][position_ids]
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    @staticmethod
    def _cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos.unsqueeze(-1) * inv_freq  # (..., head_dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        # sin carries the sign of rotate_half, so applying RoPE needs no negation (see apply_rope)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, H, T, head_dim) by their positions' angles.

    Mathematically x * cos + rotate_half(x) * sin. With signed_sin = (-sin, sin) over the halves,
    rotate_half(x) * sin == roll(x, half) * signed_sin: three memory passes instead of five, which
    matters because these elementwise ops, not the matmuls, dominate small models on a CPU.
    """
    if fused.rope_applies(x, cos, signed_sin):  # the same in one C++ pass each way (kernels/fused.py)
        return fused.rope(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
