"""Quantized matmuls: int8 and int4 codes with float32 scales, float32 activations; and for
per-channel int8 a prefill's activations rounded per token to int8/int16/int24 integers (int8 limbs)
for oneDNN's int8 x int8 matmul (`int24_dynamic_linear` and its siblings, below).

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


LIMB_TOP = {1: 127, 2: 127 * 256 + 127, 3: (127 * 256 + 127) * 256 + 127}
"""Integer activations of 1, 2 or 3 int8 limbs (int8, int16, int24) stop here: the largest |v| whose
base-256 digits all fit int8 (v = 256 h + l, 65536 h + 256 m + l)."""


@functools.cache
def _load_dynamic() -> bool:
    if not (build.has("quantize_rows") and build.has("dequantize_sums")):
        return False

    @torch.library.register_fake("lmlab::quantize_rows")
    def _(x, limbs):
        return x.new_empty(x.shape[0] * limbs, x.shape[1], dtype=torch.int8), x.new_empty(x.shape[0], 1)

    @torch.library.register_fake("lmlab::dequantize_sums")
    def _(s, scale_x, scale_w, bias, limbs):
        return scale_x.new_empty(s.shape[0] // limbs, s.shape[1])

    return True


@torch.compiler.assume_constant_result
def _dynamic_ops() -> bool:
    """Whether the rounding and scaling operators run here (a constant to torch.compile, as `available`)."""
    return _load_dynamic()


def quantize_rows(x: torch.Tensor, limbs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 rounded per row to integers v in [-top, top] (top = LIMB_TOP[limbs], max |x| ->
    top): (codes int8 (limbs * M, K), scales (M, 1)). v is written in base 256 with signed int8 digits,
    the highest in rows [0, M), the next in [M, 2M), ..., so one int8 matmul of the codes gives every
    digit's sums."""
    if x.device.type == "cpu" and _dynamic_ops():
        return torch.ops.lmlab.quantize_rows(x, limbs)
    top = float(LIMB_TOP[limbs])
    sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
    v = torch.round(x / sx).clamp(-top, top)  # max |x| / sx may round one past the top
    digits = []
    for _ in range(limbs - 1):  # lowest first; exact in float32 (|v| < 2^23, a power of two divides)
        h = torch.floor((v + 128) / 256)
        digits.append(v - 256 * h)
        v = h
    return torch.cat([v, *reversed(digits)]).to(torch.int8), sx


def dequantize_sums(
    s: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None, limbs: int
) -> torch.Tensor:
    """int32 sums of quantize_rows' codes x weight codes -> float32 (M, N): the digits' sums put
    together (in float64, exactly, then rounded once) times each row's and each column's scale, plus
    bias."""
    if s.device.type == "cpu" and _dynamic_ops():
        return torch.ops.lmlab.dequantize_sums(s, scale_x, scale_w.reshape(-1), bias, limbs)
    if limbs == 1:
        total = s.float()
    else:
        digits = s.double().reshape(limbs, -1, s.shape[1])
        total = digits[0]
        for d in digits[1:]:
            total = total * 256.0 + d
        total = total.float()
    y = total * scale_x * scale_w.reshape(1, -1)
    return y if bias is None else y + bias


def _dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, limbs: int):
    if torch.is_grad_enabled() and x.requires_grad:
        # integer rounding has no gradient (the C++ ops have no autograd; backward would silently
        # drop x's): a gradient through the layer (LoRA on a quantized base) takes the float path
        return int8_linear(x, q, scale, bias)
    shape = x.shape
    xq, sx = quantize_rows(x.reshape(-1, shape[-1]).float().contiguous(), limbs)
    s = torch._int_mm(xq, q.t())  # int8 x int8 -> int32 (oneDNN, VNNI): exact integer sums
    y = dequantize_sums(s, sx, scale.float(), None if bias is None else bias.float(), limbs)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize_int8(q, scale).T + bias with x rounded per row to int8 (symmetric, max |x| -> 127)
    and an int8 x int8 -> int32 product: W8A8 dynamic. Per-channel scales (N, 1) only. Not exact."""
    return _dynamic_linear(x, q, scale, bias, limbs=1)


def int16_dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """As int8_dynamic_linear with x rounded per row to 16-bit integers (max |x| -> 32639), multiplied
    as two int8 limbs in one int8 matmul of twice the rows: each activation within max |x| / 65278 of
    its value (int8: / 254), at twice int8's arithmetic (still half of float32's on VNNI). Per-channel
    scales (N, 1) only."""
    return _dynamic_linear(x, q, scale, bias, limbs=2)


def int24_dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """As int16_dynamic_linear with three limbs (max |x| -> 8355711): each activation within
    max |x| / 2^23 of its value (float32's rounding for a row's largest entries, coarser for its small
    ones: a layer's output a few times float32's rounding off, docs/compress.md), at three
    quarters of float32's arithmetic on VNNI. Per-channel scales (N, 1) only."""
    return _dynamic_linear(x, q, scale, bias, limbs=3)


DYNAMIC_LINEARS = {"int8": int8_dynamic_linear, "int16": int16_dynamic_linear, "int24": int24_dynamic_linear}
"""The dynamically quantized linears by activation type (QuantConfig.activations)."""


def int4_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize_int4(q, scale, offset).T + bias."""
    if _plain(x) and q.device.type == "cpu" and available():
        return torch.ops.lmlab.int4_linear(x, q, scale, offset, bias)
    w = dequantize_int4(q, scale, offset).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
