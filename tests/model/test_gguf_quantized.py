"""GGUF files load without dequantizing: Q8_0/Q4_0/Q4_1 blocks become QuantLinear layers whose
weights are exactly what gguf.quants dequantizes, and the real SmolLM2 file (Q4_1, Q8_0 embedding)
computes what its dequantized float32 load computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from lmlab.generate import GenerationConfig
from lmlab.generate.decode import generate_ids
from lmlab.kernels import quant
from lmlab.model.checkpoint import load_pretrained
from lmlab.model.gguf import gguf_blocks
from lmlab.model.quantized import QuantLinear, quantized_bytes


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_blocks_decode_to_what_gguf_dequantizes(kind):
    w = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    raw = quantize(w, kind)  # (6, bytes per row)
    codes, scale, offset = gguf_blocks(raw, kind.name)
    ours = quant.dequantize_int8(codes, scale) if offset is None else quant.dequantize_int4(codes, scale, offset)
    np.testing.assert_allclose(ours.numpy(), dequantize(raw, kind), rtol=0, atol=1e-6)


def test_smollm2_gguf_runs_quantized_and_equals_the_dequantized_load(smollm2_gguf):
    ref, tok = load_pretrained(smollm2_gguf)
    model, _ = load_pretrained(smollm2_gguf, dequantize=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 30 * 7 + 1  # every block linear and the head (from the Q8_0 embedding)
    assert quantized_bytes(model) < 0.45 * quantized_bytes(ref)
    ids = torch.tensor([tok.encode("The capital of France is Paris. 中国的首都是北京。")])
    with torch.no_grad():
        for x in (ids, ids[:, :1]):  # prefill rows, then a decode-sized row
            a, b = ref(x), model(x)
            assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    gen = GenerationConfig(max_new_tokens=16)
    assert torch.equal(generate_ids(ref, ids, config=gen), generate_ids(model, ids, config=gen))
