"""The decode kernels against torch's own matmul and attention, and decoding with them on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.generate import GenerationConfig, cpu_kernels, generate_ids
from lmlab.generate.decode import left_pad
from lmlab.model.config import PRESETS, ModelConfig

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="decode kernels need x86 AVX-512 and a C++ compiler"
)


def _calls(prof, op: str) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == op)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize(("n", "k"), [(2, 16), (3, 17), (192, 576), (577, 100), (5, 1536)])
def test_linear_equals_f_linear(rows, n, k):
    torch.manual_seed(rows * n + k)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    for bias in (None, b):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        out = cpu_kernels.linear(x, w, bias)
        # float32 sums of k products in another order: relative to the largest output
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6


def test_linear_keeps_leading_dimensions_and_takes_the_kernel():
    x, w = torch.randn(2, 3, 64), torch.randn(10, 64)
    with torch.profiler.profile() as prof:
        out = cpu_kernels.linear(x, w)
    assert _calls(prof, "lmlab::skinny_linear") == 1
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["many rows", "gradient wanted", "float64", "one output"],
)
def test_linear_leaves_what_it_does_not_cover_to_torch(case):
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    if case == "many rows":
        x = torch.randn(cpu_kernels.LINEAR_MAX_ROWS + 1, 32)
    elif case == "gradient wanted":
        w.requires_grad_(True)
    elif case == "float64":
        x, w = x.double(), w.double()
    else:
        w = torch.randn(1, 32)
    with torch.profiler.profile() as prof:
        out = cpu_kernels.linear(x, w)
    assert _calls(prof, "lmlab::skinny_linear") == 0
    torch.testing.assert_close(out, F.linear(x, w))
    if case == "gradient wanted":
        out.sum().backward()
        assert w.grad is not None


def _attention_inputs(B, H, Hkv, S, D, seed=0):
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    keep = torch.rand(B, 1, 1, S) > 0.3
    keep[..., 0] = True
    keep[0, ..., S // 2 :] = False  # a row whose last keys are all hidden (an unwritten static cache)
    bias = torch.randn(1, H, 1, S).masked_fill(torch.rand(1, H, 1, S) > 0.8, float("-inf"))
    bias[..., 0] = 0.0
    return q, k, v, keep, bias


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "S", "D"), [(1, 9, 3, 192, 64), (8, 9, 3, 70, 64), (3, 8, 2, 33, 20), (2, 4, 4, 7, 16)]
)
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_equals_sdpa(B, H, Hkv, S, D, mask, scale):
    q, k, v, keep, bias = _attention_inputs(B, H, Hkv, S, D)
    m = {"none": None, "bool": keep, "float": bias}[mask]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)
    with torch.profiler.profile() as prof:
        out = cpu_kernels.attention(q, k, v, m, scale=scale, enable_gqa=True)
    assert _calls(prof, "lmlab::decode_attention") == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [2, 5, 16])
@pytest.mark.parametrize(("H", "Hkv", "S"), [(9, 3, 192), (4, 4, 16)])
@pytest.mark.parametrize("mask", ["causal", "float", "none", "one row"])
def test_a_few_queries_of_one_sequence_equal_sdpa(T, H, Hkv, S, mask):
    """A speculative check: T new queries after S - T cached keys, each seeing the keys up to its own,
    over keys and values that are slices of a cache's buffers."""
    torch.manual_seed(T + S)
    D = 64
    q = torch.randn(1, T, H, D).transpose(1, 2)  # (1, H, T, D), as the attention layer makes it
    kb, vb = torch.randn(1, Hkv, S + 8, D), torch.randn(1, Hkv, S + 8, D)
    k, v = kb[:, :, :S], vb[:, :, :S]
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]  # (1, 1, T, S)
    bias = torch.randn(1, H, T, S).masked_fill(~causal, float("-inf"))
    one_row = torch.rand(1, H, 1, S) > 0.3
    one_row[..., 0] = True
    m = {"causal": causal, "float": bias, "none": None, "one row": one_row}[mask]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    with torch.profiler.profile() as prof:
        out = cpu_kernels.attention(q, k, v, m, enable_gqa=True)
    assert _calls(prof, "lmlab::decode_attention") == 1
    assert out.shape == (1, H, T, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    q17 = torch.randn(1, H, 17, D)  # more queries than the kernel takes: torch's attention
    per_row = causal.transpose(0, 2)  # (T, 1, 1, S): not a mask of this one sequence; SDPA's own error
    with torch.profiler.profile() as prof:
        cpu_kernels.attention(q17, k, v, None, enable_gqa=True)
        with pytest.raises(RuntimeError):
            cpu_kernels.attention(q, k, v, per_row, enable_gqa=True)
    assert _calls(prof, "lmlab::decode_attention") == 0


def test_attention_reads_strided_caches_and_leaves_the_rest_to_sdpa():
    q, k, v, keep, _ = _attention_inputs(2, 4, 2, 24, 32)
    # keys and values as slices of a larger buffer, as a KV cache hands them out
    kb, vb = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    kb[:, :, :24], vb[:, :, :24] = k, v
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    torch.testing.assert_close(cpu_kernels.attention(q, kb[:, :, :24], vb[:, :, :24], keep, enable_gqa=True), ref)
    # two queries, a causal flag, dropout: torch's own attention
    q2 = torch.randn(2, 4, 2, 32)
    with torch.profiler.profile() as prof:
        cpu_kernels.attention(q2, k, v, None, enable_gqa=True)
        cpu_kernels.attention(q, k, v, None, is_causal=True, enable_gqa=True)
        cpu_kernels.attention(q, k, v, None, dropout_p=0.1, enable_gqa=True)
    assert _calls(prof, "lmlab::decode_attention") == 0


def test_decode_kernels_context_under_compile():
    lin = torch.nn.Linear(64, 10)
    x = torch.randn(3, 1, 64)

    @torch.compile(fullgraph=True)
    def step(x):
        with cpu_kernels.DecodeKernels():
            return lin(x).relu()

    with torch.no_grad():
        step(x)  # compiles
        with torch.profiler.profile() as prof:
            out = step(x)
    assert _calls(prof, "lmlab::skinny_linear") == 1  # the compiled graph calls the operator
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias).relu(), rtol=1e-5, atol=1e-5)


DECODERS = [name for name, p in PRESETS.items() if p.get("causal", True) and name.endswith("tiny")]


@pytest.mark.parametrize("preset", DECODERS)
def test_batched_greedy_decode_with_kernels_equals_without(preset, monkeypatch):
    """Eager decoding at batch > 1 runs in DecodeKernels: logits stay within float32 rounding of
    torch's kernels, so greedy tokens on a random tiny model are the same."""
    torch.manual_seed(0)
    m = lmlab.Transformer(ModelConfig.from_preset(preset, max_seq_len=64)).eval()
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 512, (n,)).tolist() for n in (6, 9, 3)], 0)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    with torch.profiler.profile() as prof:
        fast = generate_ids(m, ids, mask, config, eos=[], pad_id=0)
    assert _calls(prof, "lmlab::skinny_linear") > 0
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    plain = generate_ids(m, ids, mask, config, eos=[], pad_id=0)
    assert fast.tolist() == plain.tolist()
