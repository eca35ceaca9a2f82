"""Round-to-nearest: with groups of 32 its codes are llama.cpp's (gguf.quants' Q8_0, Q4_0, Q4_1 on the
same blocks, the reference implementation), and every weight is within half a step of its value
(one step where Q4_0's rule clips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from lmlab.compress.rtn import dequantize_with, group_params, quantize_rtn, quantize_with
from lmlab.errors import LmlabError
from lmlab.kernels import quant
from lmlab.model.quantized import QuantConfig


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = 0.5  # a constant block
    w[2, 32:64] *= 40  # large magnitudes
    w[3, 5] = -3.0  # the largest magnitude negative
    return w


def _gguf_codes(w: torch.Tensor, kind: T) -> np.ndarray:
    raw = gguf_quantize(w.numpy(), kind).reshape(-1)
    if kind == T.Q8_0:
        blocks = raw.reshape(-1, 34)
        return blocks[:, 2:].view(np.int8).reshape(w.shape)
    head = 2 if kind == T.Q4_0 else 4
    blocks = raw.reshape(-1, head + 16)[:, head:]
    return np.concatenate([blocks & 0xF, blocks >> 4], axis=1).reshape(w.shape)


@pytest.mark.parametrize(("kind", "bits", "sym"), [(T.Q8_0, 8, True), (T.Q4_0, 4, True), (T.Q4_1, 4, False)])
def test_codes_equal_llama_cpp_blocks(kind, bits, sym):
    w = _weights()
    scale, offset = group_params(w.reshape(-1, 32), bits, sym)
    codes = quantize_with(w.reshape(-1, 32), scale, offset, bits, sym).reshape(w.shape)
    assert np.array_equal(codes.numpy().astype(np.int16), _gguf_codes(w, kind).astype(np.int16))


@pytest.mark.parametrize(("bits", "group", "sym"), [(8, None, True), (8, 32, True), (4, 32, True), (4, 64, False)])
def test_every_weight_within_half_a_step(bits, group, sym):
    w = _weights(1)
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym)
    qweight, scales, offsets = quantize_rtn(w, cfg)
    deq = quant.dequantize_int8(qweight, scales) if bits == 8 else quant.dequantize_int4(qweight, scales, offsets)
    step = scales.repeat_interleave(w.shape[1] // scales.shape[1], dim=1).abs()
    # Q4_0's rule puts the largest magnitude on code 0 (-8 steps); the other side reaches only +7
    # steps, so a weight there may be clipped by up to one step
    bound = step if (bits == 4 and sym) else step / 2
    assert bool(((deq - w).abs() <= bound + 1e-6).all())
    # and the codes are what a direct round gives
    g = w.reshape(-1, group or w.shape[1])
    s, o = group_params(g, bits, sym)
    direct = dequantize_with(quantize_with(g, s, o, bits, sym), s, o).reshape(w.shape)
    torch.testing.assert_close(deq, direct, rtol=0, atol=1e-6)


def test_bad_settings_name_the_problem():
    with pytest.raises(LmlabError, match="bits must be 8 or 4"):
        QuantConfig(bits=3, group_size=32)
    with pytest.raises(LmlabError, match="multiple of 32"):
        QuantConfig(bits=4, group_size=48)
    with pytest.raises(LmlabError, match=r"does not divide the width 96 of layers\.0\.mlp\.down"):
        quantize_rtn(torch.randn(4, 96), QuantConfig(bits=4, group_size=64), "layers.0.mlp.down")
