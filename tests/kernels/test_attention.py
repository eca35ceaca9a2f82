"""lmlab's CPU training attention against SDPA in float64, in eager and compiled models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.generate import GenerationConfig, generate_ids
from lmlab.kernels import attention, build, fused
from lmlab.model.config import ModelConfig
from lmlab.model.rope import apply_rope

pytestmark = pytest.mark.skipif(not build.has("attention"), reason="lmlab's CPU kernels are not built here")

TOL = 1e-5  # float32 results against a float64 reference, relative to the largest value (or to 1:
# with a single key the query gradient is zero, and float32 leaves ~1e-7 of rounding there)


def _projection_view(B: int, T: int, H: int, D: int, dtype=torch.float32) -> torch.Tensor:
    # how the attention layer hands over q, k and v: (B, T, H, D) memory viewed as (B, H, T, D)
    return torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)


def _reference(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


CASES = [  # B, H, Hkv, T, D, causal
    (2, 4, 4, 64, 32, True),  # one block exactly
    (1, 3, 3, 257, 64, True),  # a ragged last block of one row
    (2, 4, 2, 100, 32, True),  # grouped keys and values (GQA)
    (2, 6, 1, 130, 16, True),  # one key/value head (MQA)
    (2, 2, 2, 1, 64, True),  # a single token
    (2, 2, 1, 70, 80, False),  # bidirectional (an encoder), a head size that is no power of two
]


@pytest.mark.parametrize(("B", "H", "Hkv", "T", "D", "causal"), CASES)
def test_attention_and_its_gradients_match_sdpa_in_float64(B, H, Hkv, T, D, causal):
    torch.manual_seed(B * T + D)
    q, k, v = _projection_view(B, T, H, D), _projection_view(B, T, Hkv, D), _projection_view(B, T, Hkv, D)
    assert attention.applies(q, k, v, causal=causal, masked=False, dropout=0.0)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    y, y_ref = attention.attention(*ours, causal), _reference(*ref, causal)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for got, want in [(y, y_ref)] + [(a.grad, b.grad) for a, b in zip(ours, ref)]:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item() <= TOL
    # results in the projections' layout: the output projection reads y without a copy
    assert y.transpose(1, 2).is_contiguous() and ours[0].grad.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "T", "D", "angle_batch", "causal"),
    [(2, 4, 2, 100, 32, 1, True), (3, 3, 3, 130, 64, 3, True), (2, 4, 1, 70, 16, 2, False)],
)
def test_rotary_embedding_inside_the_kernel_matches_apply_rope_then_sdpa(B, H, Hkv, T, D, angle_batch, causal):
    torch.manual_seed(T + D)
    q, k, v = _projection_view(B, T, H, D), _projection_view(B, T, Hkv, D), _projection_view(B, T, Hkv, D)
    # any angles will do: the kernel must apply exactly the rotation apply_rope does
    cos, sin = torch.randn(angle_batch, 1, T, D), torch.randn(angle_batch, 1, T, D)
    assert attention.applies(q, k, v, rope=(cos, sin), causal=causal, masked=False, dropout=0.0)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    y = attention.attention(*ours, causal, (cos, sin))
    rope64 = (cos.double(), sin.double())
    y_ref = _reference(apply_rope(ref[0], *rope64), apply_rope(ref[1], *rope64), ref[2], causal)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for got, want in [(y, y_ref)] + [(a.grad, b.grad) for a, b in zip(ours, ref)]:
        assert ((got.double() - want).abs().max() / want.abs().max()).item() <= TOL


@pytest.mark.parametrize("case", ["angles with a gradient", "angles per head", "fewer queries than keys", "float64"])
def test_angles_the_kernel_does_not_take(case):
    B, H, T, D = 2, 4, 16, 8
    q, k, v = (_projection_view(B, T, H, D) for _ in range(3))
    cos, sin = torch.randn(B, 1, T, D), torch.randn(B, 1, T, D)
    causal = True
    if case == "angles with a gradient":
        cos.requires_grad_()
    elif case == "angles per head":
        cos, sin = cos.expand(B, H, T, D), sin.expand(B, H, T, D)
    elif case == "fewer queries than keys":
        q, causal = q[:, :, :4], False
        cos, sin = cos[:, :, :4], sin[:, :, :4]
    else:
        cos, sin = cos.double(), sin.double()
    assert attention.applies(q, k, v, causal=causal, masked=False, dropout=0.0)
    assert not attention.applies(q, k, v, rope=(cos, sin), causal=causal, masked=False, dropout=0.0)


def test_contiguous_inputs_and_a_strided_gradient_are_taken_too():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 80, 32, requires_grad=True) for _ in range(3))
    y = attention.attention(q, k, v, True)
    g = torch.randn(2, 80, 4, 32).transpose(1, 2)  # a gradient in another layout
    y.backward(g)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _reference(*ref, True).backward(g.double())
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=TOL * b.grad.abs().max().item())


def test_results_are_bitwise_repeatable():
    # exact resume rests on this: the same inputs give the same bits, run after run
    torch.manual_seed(0)
    q, k, v = (_projection_view(4, 200, 2, 64).requires_grad_() for _ in range(3))
    runs = []
    for _ in range(2):
        y = attention.attention(q, k, v, True)
        grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
        runs.append((y, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


B_, H_, T_, D_ = 2, 4, 16, 8


def _few_heads(q, k, v, monkeypatch):
    # fewer (batch, key/value head) pairs than threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: B_ * H_ + 1)
    return (q, k, v), {}


# each case changes the plain inputs (q, k, v) one way and says how; SDPA takes them all
NOT_COVERED = {
    "mask": lambda q, k, v, mp: ((q, k, v), {"masked": True}),
    "dropout": lambda q, k, v, mp: ((q, k, v), {"dropout": 0.1}),
    "bfloat16": lambda q, k, v, mp: ((q.bfloat16(), k.bfloat16(), v.bfloat16()), {}),
    "float64": lambda q, k, v, mp: ((q.double(), k.double(), v.double()), {}),
    "fewer queries than keys": lambda q, k, v, mp: ((q[:, :, :4], k, v), {}),
    "few heads": _few_heads,
    "value size of its own": lambda q, k, v, mp: ((q, k, _projection_view(B_, T_, H_, 2 * D_)), {}),
    "keys broadcast over the batch": lambda q, k, v, mp: ((q, k[:1], v[:1]), {}),
    "empty heads": lambda q, k, v, mp: (tuple(t[..., :0] for t in (q, k, v)), {}),
}


@pytest.mark.parametrize("case", NOT_COVERED)
def test_what_the_kernel_does_not_cover_is_left_to_sdpa(case, monkeypatch):
    q, k, v = (_projection_view(B_, T_, H_, D_) for _ in range(3))
    plain = {"causal": True, "masked": False, "dropout": 0.0}
    assert attention.applies(q, k, v, **plain)
    (q, k, v), changed = NOT_COVERED[case](q, k, v, monkeypatch)
    assert not attention.applies(q, k, v, **{**plain, **changed})


def test_forward_mode_ad_is_left_to_sdpa():
    q, k, v = (_projection_view(B_, T_, H_, D_) for _ in range(3))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, torch.randn_like(q))
        assert not attention.applies(dual, k, v, causal=True, masked=False, dropout=0.0)


def _train_step(model: torch.nn.Module, x: torch.Tensor):
    model(x, targets=x).backward()  # compiles a compiled model: the profile below is a step's own calls
    model.zero_grad()
    with torch.profiler.profile() as prof:
        loss = model(x, targets=x)
        loss.backward()
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("lmlab::attention")}
    return loss.detach(), ops


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_a_training_step_on_the_kernel_equals_one_on_sdpa(preset, compiled, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    ref_model = lmlab.Transformer(cfg)
    model = lmlab.Transformer(cfg)
    model.load_state_dict(ref_model.state_dict())
    x = torch.randint(0, cfg.vocab_size, (4, 70))
    monkeypatch.setattr(fused, "enabled", False)
    ref_loss, ref_ops = _train_step(ref_model, x)
    monkeypatch.setattr(fused, "enabled", True)
    loss, ops = _train_step(torch.compile(model) if compiled else model, x)
    assert not ref_ops
    # every layer's attention took the kernel, forward and backward, and a compiled graph calls it
    # as an external kernel (no graph break: one graph, one forward and one backward per layer)
    assert ops["lmlab::attention"] == ops["lmlab::attention_backward"] == cfg.n_layer
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, ref_p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiling_the_model_keeps_one_graph():
    model = lmlab.Transformer(ModelConfig.from_preset("llama-tiny"))
    x = torch.randint(0, model.cfg.vocab_size, (4, 16))
    explained = torch._dynamo.explain(model)(x, targets=x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_generation_with_a_kv_cache_is_left_to_sdpa():
    torch.manual_seed(0)
    model = lmlab.Transformer(ModelConfig.from_preset("llama-tiny")).eval()
    x = torch.randint(0, model.cfg.vocab_size, (4, 12))
    with torch.profiler.profile() as prof:
        generate_ids(model, x, config=GenerationConfig(max_new_tokens=3))
    assert not [e for e in prof.key_averages() if e.key.startswith("lmlab::attention")]


def test_a_second_derivative_is_refused_not_silently_zero():
    q, k, v = (_projection_view(2, 8, 2, 4).requires_grad_() for _ in range(3))
    (gq,) = torch.autograd.grad(attention.attention(q, k, v, True).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gq.sum().backward()


def test_a_single_token_takes_a_gradient_with_an_odd_stride():
    # with T = 1 a gradient can come with any stride on T (here from .mT), which torch still calls
    # contiguous; the backward must hand BLAS rows it accepts
    q, k, v = (_projection_view(2, 1, 2, 8).requires_grad_() for _ in range(3))
    w = torch.randn(2, 2, 8, 1)
    (attention.attention(q, k, v, True).mT * w).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (_reference(*ref, True).mT * w.double()).sum().backward()
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
