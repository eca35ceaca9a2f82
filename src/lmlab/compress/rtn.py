"""Round-to-nearest weight quantization: the baseline every smarter method (GPTQ) is measured against.

Each group of `group_size` weights along a row (the whole row for per-channel int8) gets a scale,
and int4 an offset, chosen from its own values; every weight becomes the nearest code:

- int8, symmetric: scale = max|w| / 127, code = round(w / scale) in -127..127.
- int4, symmetric (llama.cpp's Q4_0 rule): the value of largest magnitude maps to code 0, so all 16
  levels are used: scale = that value / -8, code = round(w / scale) + 8 in 0..15, offset = -8 * scale.
- int4, asymmetric (Q4_1's rule): scale = (max - min) / 15, offset = min, code = round((w - min) / scale).

`group_params` and `quantize_with` are shared with gptq.py, which quantizes a column at a time
with the group's parameters fixed when it reaches the group's first column.
"""

from __future__ import annotations

import torch

from lmlab.kernels import quant
from lmlab.model.quantized import QuantConfig


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset for each row of `w` (rows, g): (rows,), (rows,), float32."""
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127
        return scale, torch.zeros_like(scale)
    if sym:
        idx = w.abs().argmax(dim=1, keepdim=True)
        scale = w.gather(1, idx).squeeze(1) / -8
        return scale, -8 * scale
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    return (hi - lo) / 15, lo


def quantize_with(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """The nearest codes of `w` (rows, ...) under per-row scale and offset (rows,): int8 codes, or int4
    codes 0..15 (unpacked, int16). The arithmetic is llama.cpp's (float32, its rounding), so with
    groups of 32 the codes are Q8_0's, Q4_0's and Q4_1's."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    w = w.float()
    scale = scale.float()
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale)).reshape(shape)
    if bits == 8:
        x = w * inv
        return (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)  # C's roundf
    if sym:
        return torch.trunc(w * inv + 8.5).clamp_(0, 15).to(torch.int16)
    return torch.trunc((w - offset.float().reshape(shape)) * inv + 0.5).clamp_(0, 15).to(torch.int16)


def dequantize_with(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The weights `codes` stand for: codes * scale + offset, per row."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return codes.float() * scale.reshape(shape) + offset.reshape(shape)


def quantize_rtn(
    w: torch.Tensor, config: QuantConfig, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, in) float weight -> (qweight, scales, offsets) in the layout QuantLinear holds."""
    n, k = w.shape
    groups = config.groups(k, name)
    g = w.reshape(n * groups, k // groups)
    scale, offset = group_params(g, config.bits, config.sym)
    codes = quantize_with(g, scale, offset, config.bits, config.sym).reshape(n, k)
    scales = scale.reshape(n, groups).contiguous()
    if config.bits == 8:
        return codes.contiguous(), scales, None
    return quant.pack_int4(codes), scales, offset.reshape(n, groups).contiguous()
