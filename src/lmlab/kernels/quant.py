"""Weight-only quantized matmuls: int8 and int4 codes with float32 scales, float32 activations.

The layouts are the kernels' (csrc/quant_matmul.cpp) and GGUF's:

- int8: codes (N, K) int8; weight = code * scale[n, k // G]. G = K is per output channel; G = 32 is
  llama.cpp's Q8_0.
- int4: codes packed two per byte (N, K / 2) uint8 in blocks of 32 weights: byte j of a block holds
  weight j in its low nibble and weight j + 16 in its high nibble (Q4_0/Q4_1's order, so their
  blocks load unchanged); weight = code * scale[n, k // G] + offset[n, k // G]. Symmetric int4 (Q4_0)
  has offset = -8 * scale.

`int8_linear` and `int4_linear` run the C++ operators where they apply (float32 CPU activations
without autograd, on an AVX-512 build) and otherwise dequantize and call F.linear (a GPU, a
gradient through the activations for QLoRA-style training, another CPU), so callers never check.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lmlab.kernels import build

BLOCK = 32
"""int4 weights are packed in blocks of 32; int4 groups are multiples of it."""


@functools.cache
def _load() -> bool:
    if not (build.has("int8_linear") and build.has("int4_linear")):
        return False

    @torch.library.register_fake("lmlab::int8_linear")
    def _(x, q, scale, bias):
        return x.new_empty(*x.shape[:-1], q.shape[0])

    @torch.library.register_fake("lmlab::int4_linear")
    def _(x, q, scale, offset, bias):
        return x.new_empty(*x.shape[:-1], q.shape[0])

    return True


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the quantized C++ operators run here (built on first call)."""
    return _load()


def _plain(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, K / 2) uint8 in the kernels' block order."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)  # (N, blocks, low/high, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) codes in 0..15 (int16)."""
    n, half = packed.shape
    b = packed.reshape(n, half // (BLOCK // 2), BLOCK // 2).to(torch.int16)
    return torch.stack((b & 0xF, b >> 4), dim=2).reshape(n, 2 * half)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) weights from int8 codes and (N, groups) scales."""
    n, k = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(n, groups, k // groups) * scale.float()[:, :, None]).reshape(n, k)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) weights from packed int4 codes and (N, groups) scales and offsets."""
    codes = unpack_int4(q).float()
    n, k = codes.shape
    groups = scale.shape[1]
    w = torch.addcmul(offset.float()[:, :, None], codes.reshape(n, groups, k // groups), scale.float()[:, :, None])
    return w.reshape(n, k)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize_int8(q, scale).T + bias."""
    if _plain(x) and q.device.type == "cpu" and available():
        return torch.ops.lmlab.int8_linear(x, q, scale, bias)
    w = dequantize_int8(q, scale).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


INT16_MAX = 127 * 256 + 127
"""int16 activations stop here, so that v = 256 h + l splits into two int8 halves."""


@functools.cache
def _load_dynamic() -> bool:
    if not (build.has("quantize_rows") and build.has("dequantize_sums")):
        return False

    @torch.library.register_fake("lmlab::quantize_rows")
    def _(x, split):
        return x.new_empty(x.shape[0] * (2 if split else 1), x.shape[1], dtype=torch.int8), x.new_empty(x.shape[0], 1)

    @torch.library.register_fake("lmlab::dequantize_sums")
    def _(s, scale_x, scale_w, bias, split):
        return scale_x.new_empty(s.shape[0] // (2 if split else 1), s.shape[1])

    return True


@torch.compiler.assume_constant_result
def _dynamic_ops() -> bool:
    """Whether the rounding and scaling operators run here (a constant to torch.compile, as `available`)."""
    return _load_dynamic()


def quantize_rows(x: torch.Tensor, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 rounded per row: (codes int8, scales (M, 1)). split False: int8, max |x| -> 127.
    split True: int16 in [-INT16_MAX, INT16_MAX] as two int8 halves v = 256 h + l, codes (2M, K) with
    h in rows [0, M) and l in rows [M, 2M), so one int8 matmul of them gives both halves' sums."""
    if x.device.type == "cpu" and _dynamic_ops():
        return torch.ops.lmlab.quantize_rows(x, split)
    sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / (INT16_MAX if split else 127.0)
    v = torch.round(x / sx)
    if not split:
        return v.to(torch.int8), sx
    h = torch.floor((v + 128) / 256)  # exact: |v| < 2^15, and a power of two divides
    return torch.cat([h, v - 256 * h]).to(torch.int8), sx


def dequantize_sums(
    s: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None, split: bool
) -> torch.Tensor:
    """int32 sums of quantize_rows' codes x weight codes -> float32 (M, N): each sum (256 h + l's
    when split) times its row's and its column's scale, plus bias."""
    if s.device.type == "cpu" and _dynamic_ops():
        return torch.ops.lmlab.dequantize_sums(s, scale_x, scale_w.reshape(-1), bias, split)
    s = s.float()
    if split:
        m = s.shape[0] // 2
        s = s[:m] * 256.0 + s[m:]
    y = s * scale_x * scale_w.reshape(1, -1)
    return y if bias is None else y + bias


def _dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, split: bool):
    shape = x.shape
    xq, sx = quantize_rows(x.reshape(-1, shape[-1]).float().contiguous(), split)
    s = torch._int_mm(xq, q.t())  # int8 x int8 -> int32 (oneDNN, VNNI): exact integer sums
    y = dequantize_sums(s, sx, scale.float(), None if bias is None else bias.float(), split)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize_int8(q, scale).T + bias with x rounded per row to int8 (symmetric, max |x| -> 127)
    and an int8 x int8 -> int32 product: W8A8 dynamic. Per-channel scales (N, 1) only. Not exact."""
    return _dynamic_linear(x, q, scale, bias, split=False)


def int16_dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """As int8_dynamic_linear with x rounded per row to 16-bit integers (max |x| -> 32639), multiplied
    as two int8 halves in one int8 matmul of twice the rows: each activation within max |x| / 65278
    of its value (int8: / 254), so the result is float32's to ~1e-5 of the row's largest product, at
    twice int8's arithmetic (still half of float32's on VNNI). Per-channel scales (N, 1) only."""
    return _dynamic_linear(x, q, scale, bias, split=True)


def int4_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize_int4(q, scale, offset).T + bias."""
    if _plain(x) and q.device.type == "cpu" and available():
        return torch.ops.lmlab.int4_linear(x, q, scale, offset, bias)
    w = dequantize_int4(q, scale, offset).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
