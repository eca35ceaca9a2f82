"""Q8_0 / Q4_0 blocks: byte-identical to the gguf package's reference quantizer (a port of ggml-quants.c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lmlab.compress.ggml_blocks import (
    dequantize_q4_0,
    dequantize_q8_0,
    pack_q4_0,
    pack_q8_0,
    quantize_q4_0,
    quantize_q8_0,
)
from lmlab.errors import LmlabError
from lmlab.kernels.quant import unpack_int4
from lmlab.model.gguf import gguf_blocks

FORMATS = {
    "q8_0": (GGMLQuantizationType.Q8_0, quantize_q8_0, dequantize_q8_0, pack_q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, quantize_q4_0, dequantize_q4_0, pack_q4_0),
}


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 128, generator=g)
    edge = torch.randn(8, 32, generator=g)
    edge[0] = 0  # all-zero block: scale 0, codes 0 (Q8_0) / 8 (Q4_0), no NaN
    edge[1] = torch.arange(32) - 16.0  # negative max (-16 beats 15)
    edge[2] = -edge[2].abs()  # every weight negative
    edge[3, :2] = torch.tensor([3.0, -3.0])  # a tie in magnitude: the first one wins in Q4_0
    edge[3, 2:] = 0.5
    edge[4] *= 1e4  # large magnitudes
    edge[5] *= 1e-6  # tiny ones (scale underflows float16's normal range)
    edge[6] = (torch.arange(32) - 15.5) * 127 / 15.5 / 127 * 2.5  # x / d lands on .5 ties (round half away)
    edge[7] = torch.tensor([127.0] + [63.5, -63.5, 0.5, -0.5, 1.5, -1.5] * 5 + [2.5])  # exact ties for Q8_0
    return {"random": w, "edge": edge, "3-d": torch.randn(2, 3, 64, generator=g) * 3}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["random", "edge", "3-d"])
def test_bytes_match_gguf_reference(fmt, case):
    qtype, quant, dequant, pack = FORMATS[fmt]
    w = _cases()[case]
    q, d = quant(w)
    assert q.shape == w.shape and d.shape == (*w.shape[:-1], w.shape[-1] // 32)
    assert d.dtype == torch.float16 and q.dtype == (torch.int8 if fmt == "q8_0" else torch.uint8)
    ref = quantize(w.numpy(), qtype)
    raw = pack(q, d)
    assert raw.shape == ref.shape and raw.dtype == np.uint8
    assert np.array_equal(raw, ref), f"{int((raw != ref).sum())} of {ref.size} bytes differ"
    # dequantized values: exactly the reference's (same float32 products)
    assert torch.equal(dequant(q, d), torch.from_numpy(dequantize(ref, qtype)))
    # and the loader reads back what was written (codes, scales; Q4_0's offset is -8 scales)
    rows, k = raw.reshape(-1, raw.shape[-1]).shape[0], w.shape[-1]
    codes, scale, offset = gguf_blocks(raw.reshape(rows, -1), fmt.upper())
    if fmt == "q4_0":
        codes = unpack_int4(codes).to(torch.uint8)
        assert torch.equal(offset, -8 * scale)
    assert torch.equal(codes, q.reshape(rows, k)) and torch.equal(scale, d.float().reshape(rows, -1))


def test_q4_0_codes_and_error_bound():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    q, d = quantize_q4_0(w)
    assert int(q.max()) <= 15  # uint8 codes: 16 levels
    err = (dequantize_q4_0(q, d) - w).abs().reshape(4, -1, 32)
    # nearest of 16 levels spaced |d| apart: at most half a step (plus float16 rounding of the scale), except
    # at the end opposite the block's extreme, where code 16 does not exist and 15 stands in (a full step)
    step = d.float().abs().unsqueeze(-1) * (1 + 1e-2) + 1e-6
    top = q.reshape(4, -1, 32) == 15
    assert (err <= torch.where(top, step, step / 2)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_length_not_multiple_of_32(fmt):
    _, quant, *_ = FORMATS[fmt]
    with pytest.raises(LmlabError, match="divisible by 32, got 48"):
        quant(torch.randn(2, 48))
