"""The chunked linear + cross-entropy equals F.cross_entropy(F.linear(...)) in loss and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.kernels import fused
from lmlab.model.config import ModelConfig
from lmlab.model.cross_entropy import chunk_rows, linear_cross_entropy


def _inputs(bias: bool):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 37, 16, generator=g)
    w = torch.randn(50, 16, generator=g) * 0.3
    b = torch.randn(50, generator=g) if bias else None
    t = torch.randint(0, 50, (3, 37), generator=g)
    t[0, :5] = -100
    t[2, -3:] = -100
    return h, w, b, t


def _grads(fn, h, w, b):
    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    loss = fn(*leaves) if b is not None else fn(*leaves, None)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows", [7, 64, 1000])  # a ragged last chunk, one chunk, more rows than tokens
@pytest.mark.parametrize("kernel", [True, False])  # the fused C++ softmax (where it builds), torch's ops
def test_equals_cross_entropy_of_the_logits(bias, smoothing, rows, kernel, monkeypatch):
    monkeypatch.setattr(fused, "enabled", kernel)
    h, w, b, t = _inputs(bias)

    def ref(h, w, b):
        logits = F.linear(h, w, b)
        return F.cross_entropy(logits.reshape(-1, 50), t.reshape(-1), ignore_index=-100, label_smoothing=smoothing)

    def ours(h, w, b):
        return linear_cross_entropy(h, w, t, b, label_smoothing=smoothing, rows=rows)

    loss_ref, grads_ref = _grads(ref, h, w, b)
    loss, grads = _grads(ours, h, w, b)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


def test_scaled_upstream_gradient_and_a_second_backward():
    h, w, _, t = _inputs(False)
    h = h.requires_grad_()
    loss = linear_cross_entropy(h, w, t, rows=8) * 3.0
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward()
    assert torch.equal(h.grad, first)  # the saved gradients were not scaled in place
    h2 = h.detach().clone().requires_grad_()
    (F.cross_entropy(F.linear(h2, w).reshape(-1, 50), t.reshape(-1)) * 3.0).backward()
    assert torch.allclose(first, h2.grad, rtol=1e-5, atol=1e-7)


def test_nothing_to_predict_gives_nan_like_torch():
    h, w, _, t = _inputs(False)
    t = torch.full_like(t, -100)
    ref = F.cross_entropy(F.linear(h, w).reshape(-1, 50), t.reshape(-1))
    assert torch.isnan(ref) and torch.isnan(linear_cross_entropy(h, w, t))


def test_chunk_rows_bounds():
    assert chunk_rows(8192) == 256
    assert chunk_rows(151_936) == 64  # a huge vocabulary still gets efficient matmuls
    assert chunk_rows(100) == 1024
    # a GPU takes a few large chunks: GPT-2's 50k vocabulary in chunks of 2.6k rows (512 MB of fp32 logits)
    assert chunk_rows(50_304, "cuda") == (1 << 29) // 4 // 50_304 == 2668
    assert chunk_rows(151_936, "cuda:0") == 1024 and chunk_rows(8192, torch.device("cpu")) == 256


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_model_targets_equal_the_logits_route(preset):
    torch.manual_seed(0)
    m = lmlab.Transformer(ModelConfig.from_preset(preset))
    x = torch.randint(0, m.cfg.vocab_size, (2, 24))
    y = torch.randint(0, m.cfg.vocab_size, (2, 24))
    y[:, ::3] = -100  # an MLM batch predicts some positions only
    loss = m(x, targets=y, label_smoothing=0.05)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    logits = m(x)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), label_smoothing=0.05)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_model_loss_shifts_for_decoders():
    torch.manual_seed(0)
    m = lmlab.Transformer(ModelConfig.from_preset("llama-tiny")).eval()
    x = torch.randint(0, m.cfg.vocab_size, (2, 16))
    logits = m(x)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert torch.allclose(m.loss(x, x), ref, rtol=1e-5, atol=1e-6)


def test_targets_need_a_vocabulary_head():
    m = lmlab.Transformer(ModelConfig.from_preset("bert-tiny", head="seq_cls", num_labels=2))
    with pytest.raises(ValueError, match="LM or MLM head"):
        m(torch.ones(1, 4, dtype=torch.long), targets=torch.ones(1, 4, dtype=torch.long))


def test_logits_mask_projects_only_the_chosen_positions():
    torch.manual_seed(0)
    m = lmlab.Transformer(ModelConfig.from_preset("llama-tiny")).eval()
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    chosen = torch.rand(2, 12) < 0.4
    assert torch.allclose(m(x, logits_mask=chosen), m(x)[chosen], atol=1e-6)


def test_compiled_model_takes_the_chunked_loss_eagerly_with_the_same_result():
    torch.manual_seed(0)
    m = lmlab.Transformer(ModelConfig.from_preset("llama-tiny"))
    x = torch.randint(0, m.cfg.vocab_size, (2, 16))
    y = torch.randint(0, m.cfg.vocab_size, (2, 16))
    loss = m(x, targets=y)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled = torch.compile(m)(x, targets=y)
    compiled.backward()
    assert torch.allclose(compiled, loss, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, eager[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("bias", [False, True])
def test_under_autocast_the_matmuls_run_in_bf16_and_the_softmax_in_fp32(bias):
    h, w, b, t = _inputs(bias)

    def ref(h, w, b):  # what autocast makes of the plain route: bf16 logits, fp32 cross-entropy
        logits = F.linear(h, w, b).float()
        return F.cross_entropy(logits.reshape(-1, 50), t.reshape(-1), ignore_index=-100)

    def ours(h, w, b):
        return linear_cross_entropy(h, w, t, b, rows=16)

    for fn in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = _grads(fn, h, w, b)
        if fn is ref:
            ref_loss, ref_grads = loss, grads
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # both round h and w to bf16 the same way; they differ in how bf16 gradients are rounded and summed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    # and the bf16 result is near the fp32 one
    fp32_loss, _ = _grads(ours, h, w, b)
    torch.testing.assert_close(loss, fp32_loss, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", [True, False])
def test_masked_classes_and_bad_targets_behave_like_torch(kernel, monkeypatch):
    monkeypatch.setattr(fused, "enabled", kernel)
    h, w, _, t = _inputs(False)
    bias = torch.zeros(50)
    bias[45:] = float("-inf")  # padded vocabulary slots, masked out
    t = t.clamp(max=44).masked_fill(t == -100, -100)
    ref = F.cross_entropy(F.linear(h, w, bias).reshape(-1, 50), t.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(linear_cross_entropy(h, w, t, bias), ref, rtol=1e-5, atol=1e-6)
    # an ignore_index outside the vocabulary (a padding id) is ignored, not out of range
    padded = t.masked_fill(t == -100, 50)
    ref = F.cross_entropy(F.linear(h, w).reshape(-1, 50), padded.reshape(-1), ignore_index=50)
    torch.testing.assert_close(linear_cross_entropy(h, w, padded, ignore_index=50), ref, rtol=1e-5, atol=1e-6)
    # a target that is neither a class nor ignored is an error, as in F.cross_entropy
    bad = t.clone()
    bad[1, 3] = -1
    with pytest.raises((RuntimeError, IndexError)):
        linear_cross_entropy(h, w, bad)


def test_under_autocast_the_loss_is_float32_even_for_bf16_hidden_states():
    h, w, _, t = _inputs(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_cross_entropy(h.bfloat16(), w, t).dtype == torch.float32


def test_gpu_policy_traces_the_loss_into_the_compiled_graph():
    """On a GPU the compiled step has no graph break at the loss (a few large chunks, recomputed in
    backward); forced here on the CPU, checked with dynamo's explain, and equal to eager loss and grads."""
    from lmlab.utils.device import forced_policy, policy

    torch.manual_seed(0)
    m = lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny"))
    x = torch.randint(0, 512, (2, 24))
    y = torch.randint(0, 512, (2, 24))
    y[0, :5] = -100
    loss = m(x, targets=y)
    loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    gpu = dataclasses.replace(policy("cuda"), loss_min_rows=8, loss_max_rows=16)  # 3 chunks of 16 rows
    with forced_policy(gpu):
        assert policy("cpu").trace_loss and chunk_rows(512, "cpu") == 16
        explained = torch._dynamo.explain(lambda a, b: m(a, targets=b))(x, y)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(m)(x, targets=y)
        compiled.backward()
    torch._dynamo.reset()
    assert torch.allclose(compiled, loss, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6), n


def test_gpu_policy_keeps_ignored_rows_without_a_host_sync(monkeypatch):
    """On a GPU the causal LM loss does not look for -100 labels on the host (that would stall the
    queued step); the ignored rows go through the projection and are skipped by the loss, with the
    same value and gradients. Forced here on the CPU; an MLM head still drops them."""
    from lmlab.utils.device import forced_policy, policy

    torch.manual_seed(0)
    m = lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny"))
    x, y = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    y[0, :7] = -100
    cpu_loss = m(x, targets=y)
    cpu_loss.backward()
    cpu_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    with forced_policy(policy("cuda")):
        gpu_loss = m(x, targets=y)
    monkeypatch.undo()
    assert not reads  # no tensor was read as a Python bool on the way
    gpu_loss.backward()
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-6, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, cpu_grads[n], rtol=1e-5, atol=1e-7)
