"""GPTQ: the blocked Cholesky algorithm equals the column-by-column optimal-brain-quantization
update it stands for; with uncorrelated inputs there is nothing to correct, so it equals
round-to-nearest; with correlated inputs its output error is lower."""

from __future__ import annotations

import pytest
import torch

from lmlab.compress import gptq
from lmlab.compress.gptq import gptq_quantize, layer_error
from lmlab.compress.rtn import dequantize_with, group_params, quantize_rtn, quantize_with
from lmlab.kernels import quant
from lmlab.model.quantized import QuantConfig


def _codes(q: tuple, bits: int) -> torch.Tensor:
    return q[0].to(torch.int16) if bits == 8 else quant.unpack_int4(q[0])


def _dequant(q: tuple) -> torch.Tensor:
    return quant.dequantize_int8(q[0], q[1]) if q[2] is None else quant.dequantize_int4(*q)


def _reference(w: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, damp: float) -> torch.Tensor:
    """Frantar & Alistarh's sequential form: quantize column i, spread its error with the inverse
    Hessian, remove i from the inverse (Gaussian elimination); no blocks, no Cholesky."""
    rows, cols = w.shape
    g = cfg.group_size or cols
    W, H = w.double().clone(), H.double().clone()
    s, o = group_params(W.reshape(-1, g), cfg.bits, cfg.sym)
    s, o = s.reshape(rows, -1).double(), o.reshape(rows, -1).double()
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.desc_act else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    for i in range(cols):
        grp = int(perm[i]) // g
        c = quantize_with(W[:, i], s[:, grp], o[:, grp], cfg.bits, cfg.sym)
        codes[:, i] = c.to(torch.int16)
        err = (W[:, i] - dequantize_with(c, s[:, grp], o[:, grp]).double()) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return codes[:, torch.argsort(perm)]


def _correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    scale = torch.rand(width, generator=g) * 3 + 0.1  # some inputs matter more (act-order's case)
    return (torch.randn(n, width, generator=g) @ mix) * scale


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(bits=8),
        QuantConfig(bits=4, group_size=32, sym=False),
        QuantConfig(bits=4, group_size=32, sym=True, desc_act=True),
    ],
    ids=["int8", "int4-asym", "int4-sym-actorder"],
)
def test_blocked_gptq_equals_sequential_reference(cfg, monkeypatch):
    monkeypatch.setattr(gptq, "BLOCK_COLUMNS", 48)  # several blocks, one of them partial
    w = torch.randn(24, 160, generator=torch.Generator().manual_seed(1)) * 0.05
    h = gptq.Hessian(160)
    h.add(_correlated_inputs(512, 160))
    H = h.value()
    ours = _codes(gptq_quantize(w, H, cfg, damp=0.01), cfg.bits)
    ref = _reference(w, H, cfg, damp=0.01)
    assert torch.equal(ours, ref)  # both in float64: no code sits close enough to a tie to flip
    assert (ours != _codes(quantize_rtn(w, cfg), cfg.bits)).any()  # and it did change something


def test_uncorrelated_inputs_leave_nothing_to_correct():
    cfg = QuantConfig(bits=4, group_size=32)
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    q = gptq_quantize(w, torch.eye(96) * 3.0, cfg)
    assert torch.equal(_codes(q, 4), _codes(quantize_rtn(w, cfg), 4))


@pytest.mark.parametrize("desc_act", [False, True])
def test_lower_output_error_than_round_to_nearest(desc_act):
    cfg = QuantConfig(bits=4, group_size=32, desc_act=desc_act)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    h = gptq.Hessian(128)
    h.add(_correlated_inputs(1024, 128, seed=4))
    H = h.value()
    e_gptq = layer_error(w, _dequant(gptq_quantize(w, H, cfg)), H)
    e_rtn = layer_error(w, _dequant(quantize_rtn(w, cfg)), H)
    assert e_gptq < 0.8 * e_rtn


def test_dead_inputs_get_zero_weight():
    cfg = QuantConfig(bits=8)
    x = _correlated_inputs(256, 64)
    x[:, 7] = 0  # an input that never fires
    h = gptq.Hessian(64)
    h.add(x)
    q = gptq_quantize(torch.randn(8, 64), h.value(), cfg)
    assert bool((q[0][:, 7] == 0).all())
