"""llama.cpp's Q8_0 and Q4_0 block formats, in torch.

Both cut each row into blocks of 32 weights that share one float16 scale `d`:
- Q8_0: int8 codes, value = q * d with d = max|w| / 127 and q = round(w / d) (halves away from zero).
- Q4_0: 4-bit codes 0..15, value = (q - 8) * d with d = m / -8, where m is the block's signed value of
  largest magnitude, so m itself maps to code 0 exactly and the other 15 codes spread over [-m, m).

On disk a block is the float16 scale then the codes: 2 + 32 = 34 bytes (Q8_0) or 2 + 16 = 18 bytes (Q4_0,
two codes a byte: element j in the low nibble, element j + 16 in the high one). The arithmetic follows
ggml-quants.c's reference quantizer step by step in float32 (the scale is computed in float32 and only
stored as float16), so the bytes equal `gguf.quants.quantize`'s and llama.cpp's own. Reading blocks
back is the loader's job (`model/gguf.py`'s `gguf_blocks`).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.errors import LmlabError

BLOCK = 32  # weights per block (QK8_0 = QK4_0 = 32)


def _blocks(w: torch.Tensor, name: str) -> torch.Tensor:
    """(..., K) -> (..., K // 32, 32) float32; K must be a multiple of 32."""
    if w.ndim == 0 or w.shape[-1] % BLOCK:
        k = w.shape[-1] if w.ndim else "a scalar"
        raise LmlabError(f"{name} needs a row length divisible by {BLOCK}, got {k}", field="shape")
    return w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d == 0 (an all-zero block quantizes to zeros, not NaN)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero); torch.round rounds ties to even, which would change some codes."""
    a = x.abs()
    floor = a.floor()
    return torch.sign(x) * (floor + (2 * (a - floor)).floor())


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> (q int8 (..., K), d float16 (..., K // 32)); value = q * d."""
    b = _blocks(w, "Q8_0")  # (..., nb, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    q = _round_half_away(b * _inverse(d)).to(torch.int8)
    return q.reshape(w.shape), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) from Q8_0 codes and scales."""
    b = q.float().reshape(*q.shape[:-1], -1, BLOCK)
    return (b * d.float().unsqueeze(-1)).reshape(q.shape)


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> (q uint8 codes 0..15 (..., K), d float16 (..., K // 32)); value = (q - 8) * d."""
    b = _blocks(w, "Q4_0")
    # the signed value of largest magnitude (the first one on ties, as numpy's argmax and the C loop's `>`)
    m = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))
    d = m / -8
    # truncating x + 8.5 rounds x to nearest; x = 8 (the far end, -m) would give 16, hence the clamp
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape), d.squeeze(-1).to(torch.float16)


def dequantize_q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) from Q4_0 codes (0..15) and scales."""
    b = q.float().reshape(*q.shape[:-1], -1, BLOCK) - 8
    return (b * d.float().unsqueeze(-1)).reshape(q.shape)


def _scale_bytes(d: torch.Tensor) -> np.ndarray:
    """float16 scales (..., nb) -> their little-endian bytes (..., nb, 2)."""
    return d.detach().cpu().to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*d.shape, 2)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """GGUF bytes of Q8_0 blocks: (..., K // 32 * 34) uint8, each block = d (float16) + 32 int8 codes."""
    codes = q.detach().cpu().to(torch.int8).contiguous().numpy().view(np.uint8)
    codes = codes.reshape(*q.shape[:-1], -1, BLOCK)  # (..., nb, 32)
    raw = np.concatenate([_scale_bytes(d), codes], axis=-1)  # (..., nb, 34)
    return raw.reshape(*q.shape[:-1], -1)


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """GGUF bytes of Q4_0 blocks: (..., K // 32 * 18) uint8, each block = d (float16) + 16 bytes of codes
    (element j in the low nibble of byte j, element j + 16 in the high nibble)."""
    codes = q.detach().cpu().to(torch.uint8).contiguous().numpy().reshape(*q.shape[:-1], -1, 2, BLOCK // 2)
    nibbles = codes[..., 0, :] | (codes[..., 1, :] << 4)  # (..., nb, 16)
    raw = np.concatenate([_scale_bytes(d), nibbles], axis=-1)  # (..., nb, 18)
    return raw.reshape(*q.shape[:-1], -1)
