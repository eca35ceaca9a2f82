"""The int8/int4 quantized matmuls equal F.linear on the dequantized weights, for decode-sized and
prefill-sized inputs, odd shapes, with and without bias, eagerly and under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.kernels import quant

TOL = 1e-5  # relative to the largest output: float32 sums in another order


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _int8(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return q, torch.rand(n, k // group, generator=g) * 0.02


def _int4(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    packed = quant.pack_int4(torch.randint(0, 16, (n, k), generator=g))
    return packed, torch.rand(n, k // group, generator=g) * 0.02, -torch.rand(n, k // group, generator=g) * 0.16


def test_kernels_are_built_here():
    # the quantized decode path is the point of int8/int4 on this machine (AVX-512): it must not
    # silently fall back to dequantize + F.linear
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        pytest.skip("no AVX-512 on this CPU: the torch fallback runs (tested below)")
    assert quant.available()


@pytest.mark.parametrize(("n", "k", "group"), [(96, 64, 64), (33, 48, 16), (7, 32, 32), (130, 96, 32), (2, 160, 32)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 17, 40, 64, 65])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_dequantized(n, k, group, rows, bias):
    q, scale = _int8(n, k, group)
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, k)
    ref = F.linear(x, quant.dequantize_int8(q, scale), b)
    assert _rel(quant.int8_linear(x, q, scale, b), ref) <= TOL


@pytest.mark.parametrize(("n", "k", "group"), [(96, 64, 64), (33, 64, 32), (7, 32, 32), (130, 192, 64), (3, 96, 96)])
@pytest.mark.parametrize("rows", [1, 3, 8, 12, 16, 17, 33, 64, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_equals_dequantized(n, k, group, rows, bias):
    q, scale, offset = _int4(n, k, group)
    b = torch.randn(n) if bias else None
    x = torch.randn(2, rows, k)[1]  # a view: the kernels read strided x too
    ref = F.linear(x, quant.dequantize_int4(q, scale, offset), b)
    assert _rel(quant.int4_linear(x, q, scale, offset, b), ref) <= TOL


def test_batched_leading_dims_and_fallback_with_grad():
    q, scale, offset = _int4(64, 64, 32)
    x = torch.randn(3, 2, 64, requires_grad=True)  # a gradient wanted: the torch path, with autograd
    y = quant.int4_linear(x, q, scale, offset)
    ref = F.linear(x.detach(), quant.dequantize_int4(q, scale, offset))
    assert y.shape == (3, 2, 64) and _rel(y.detach(), ref) <= TOL
    y.sum().backward()
    torch.testing.assert_close(x.grad, quant.dequantize_int4(q, scale, offset).sum(0).expand(3, 2, 64))


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 64))
    packed = quant.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), codes.to(torch.int16))
    # GGUF's Q4_0 order: byte j of a block holds weight j (low nibble) and j + 16 (high nibble)
    assert int(packed[0, 3]) == int(codes[0, 3]) | (int(codes[0, 19]) << 4)
    assert int(packed[0, 16 + 3]) == int(codes[0, 32 + 3]) | (int(codes[0, 32 + 19]) << 4)


def test_under_torch_compile():
    q, scale = _int8(64, 64, 32)
    q4, s4, o4 = _int4(64, 64, 32)
    fn = torch.compile(lambda x: quant.int4_linear(quant.int8_linear(x, q, scale), q4, s4, o4), dynamic=False)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = F.linear(F.linear(x, quant.dequantize_int8(q, scale)), quant.dequantize_int4(q4, s4, o4))
        assert _rel(fn(x), ref) <= TOL


@pytest.mark.parametrize("activations", ["int8", "int16", "int24"])
def test_dynamic_linear_under_torch_compile(activations):
    """The rounding and scaling operators trace (their fake shapes), and the graph gives the eager bits."""
    q, scale = _int8(48, 96, 96)
    dynamic = getattr(quant, f"{activations}_dynamic_linear")
    fn = torch.compile(lambda x: dynamic(x, q, scale), dynamic=False, fullgraph=True)
    x = torch.randn(70, 96)
    with torch.no_grad():
        assert torch.equal(fn(x), dynamic(x, q, scale))


def _formula(monkeypatch, fn, *args):
    """`fn(*args)` through quant.py's torch formula instead of the C++ operators."""
    with monkeypatch.context() as m:
        m.setattr(quant, "_dynamic_ops", lambda: False)
        return fn(*args)


@pytest.mark.parametrize("limbs", [1, 2, 3])
@pytest.mark.parametrize(("m", "k", "n"), [(70, 96, 48), (3, 40, 17), (130, 576, 33), (1, 16, 1)])
def test_dynamic_quantization_ops_are_bit_identical_to_the_formula(monkeypatch, limbs, m, k, n):
    """quantize_rows / dequantize_sums (one pass each) give exactly the torch formula's bits: the same
    float operations in the same order, round half to even (x / s lands on .5 often: x is scaled)."""
    if not quant._dynamic_ops():
        pytest.skip("no AVX-512 build here: the formula is all there is")
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, k // 2] = 500.0  # an outlier sets its row's scale
    x[-1, :3] = 0.0
    if m > 2:
        x[1] = 0.0  # an all-zero row: the clamped scale, all codes 0
        # a row whose scale is exactly 1 and whose values are all halves: -2.5, -1.5, ..., 2.5 round
        # to even (-2, -2, ..., 2), where rounding half away from zero would give -3 and 3
        top = quant.LIMB_TOP[limbs]
        x[2] = (torch.arange(k) % 6 - 2.5).float()
        x[2, 0] = top
    if m > 4:  # a row holding a NaN and one holding an infinity: NaN codes are 0 and the scales NaN / inf
        x[3, 1], x[4, 2] = float("nan"), float("inf")
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale, bias = torch.rand(n, 1, generator=g) / 50, torch.randn(n, generator=g)
    codes, sx = quant.quantize_rows(x, limbs)
    want_codes, want_sx = _formula(monkeypatch, quant.quantize_rows, x, limbs)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(sx, want_sx, rtol=0, atol=0, equal_nan=True)
    sums = torch._int_mm(codes, q.t()) if codes.shape[0] > 16 else codes.int() @ q.int().t()
    for b in (bias, None):
        got = quant.dequantize_sums(sums, sx, scale, b, limbs)
        want = _formula(monkeypatch, quant.dequantize_sums, sums, sx, scale, b, limbs)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("limbs", [2, 3])
def test_integer_codes_split_into_int8_limbs_exactly(limbs):
    """v = round(x / s) in [-top, top] comes back as its base-256 digits (256 h + l; 65536 h + 256 m + l),
    every digit in int8. Each row's extreme lands on +-top (all digits +-127); with three limbs
    max |x| / s may round one past it (float32's spacing there is 0.5: 5 of these 40 rows) and is
    clamped back, or one short (5 rows)."""
    g = torch.Generator().manual_seed(1)
    top = quant.LIMB_TOP[limbs]
    x = torch.randn(40, 96, generator=g) * 0.1
    x[:, 0] = (1 + torch.rand(40, generator=g)) * torch.tensor([1.0, -1.0]).repeat(20)  # each row's extreme, both signs
    codes, sx = quant.quantize_rows(x, limbs)
    digits = codes.int().reshape(limbs, 40, 96)
    total = digits[0]
    for d in digits[1:]:
        total = total * 256 + d
    unclamped = torch.round(x / sx)
    v = unclamped.clamp(-top, top)
    assert torch.equal(total, v.int())
    extremes = unclamped[:, 0].abs() - top
    if limbs == 3:
        assert int((extremes == 1).sum()) == 5 and int((extremes == -1).sum()) == 5
    else:
        assert not extremes.any()
    at_top = extremes >= 0
    assert torch.equal(v[at_top, 0].abs(), torch.full((int(at_top.sum()),), float(top)))
    assert torch.equal(digits[:, at_top, 0].abs(), torch.full((limbs, int(at_top.sum())), 127, dtype=torch.int32))
    assert int(digits.min()) >= -128 and int(digits.max()) <= 127
    # the sums of the digits' codes put together equal the sums of the integers themselves (exact)
    q = torch.randint(-127, 128, (8, 96), dtype=torch.int8, generator=g)
    ones = torch.ones(8, 1)
    got = quant.dequantize_sums(torch._int_mm(codes, q.t()), torch.ones(40, 1), ones, None, limbs)
    assert torch.equal(got.double(), (v.double() @ q.double().t()).float().double())


@pytest.mark.parametrize("limbs", [2, 3])
def test_digit_sums_are_put_together_exactly_then_rounded_once(monkeypatch, limbs):
    """Large digit sums (a wide layer's, up to 2^30): 65536 s_h + 256 s_m + s_l is exact in float64
    and rounded to float32 once; float32 steps would round twice, off by an ulp here and there."""
    g = torch.Generator().manual_seed(limbs)
    sums = torch.randint(-(2**30), 2**30, (limbs * 64, 48), generator=g, dtype=torch.int32)
    digits = sums.double().reshape(limbs, 64, 48)
    want = digits[0]
    for d in digits[1:]:
        want = want * 256 + d  # exact: |want| < 2^53
    ones_x, ones_w = torch.ones(64, 1), torch.ones(48, 1)
    for fn in (quant.dequantize_sums, lambda *a: _formula(monkeypatch, quant.dequantize_sums, *a)):
        assert torch.equal(fn(sums, ones_x, ones_w, None, limbs), want.float())


def test_dynamic_linear_keeps_nan_and_takes_bfloat16():
    """A NaN activation makes its row's outputs NaN (as torch's formula does; the C++ max would drop
    it), the other rows untouched; bfloat16 activations and scales (a model moved with .to) run."""
    q, scale = _int8(24, 80, 80)
    x = torch.randn(70, 80)
    x[3, 7] = float("nan")
    for dynamic in quant.DYNAMIC_LINEARS.values():
        y = dynamic(x, q, scale)
        assert torch.isnan(y[3]).all() and not torch.isnan(y[torch.arange(70) != 3]).any()
        clean = x.nan_to_num(0.0)
        want = dynamic(clean, q, scale)
        got = dynamic(clean.bfloat16(), q, scale.bfloat16())
        assert got.dtype == torch.bfloat16
        assert _rel(got.float(), want) < 2e-2  # bfloat16 in and out: its own rounding only
