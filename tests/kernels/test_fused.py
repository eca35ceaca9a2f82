"""The fused RMSNorm, SwiGLU and RoPE kernels against their reference math, and a model using them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.kernels import attention, build, fused
from lmlab.model.config import ModelConfig

pytestmark = pytest.mark.skipif(not build.load(), reason="lmlab's CPU kernels need x86 AVX-512 and a C++ compiler")

TOL = 1e-5  # float32 results against a float64 reference, relative to the largest value


def _ops(prof) -> dict[str, int]:
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("lmlab::")}


def _check(fast, reference, inputs: list[torch.Tensor]) -> None:
    """fast (float32) and reference (float64) agree on outputs and on every input's gradient."""
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    b = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ya, yb = fast(*a), reference(*b)
    assert ya.dtype == torch.float32 and ya.shape == yb.shape
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.double())
    for got, want in [(ya, yb)] + [(x.grad, y.grad) for x, y in zip(a, b) if x.requires_grad]:
        assert ((got.double() - want).abs().max() / want.abs().max()).item() <= TOL


@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 389), (2, 64, 384), (1, 3)])
def test_rms_norm_matches_f_rms_norm(shape):
    torch.manual_seed(sum(shape))
    x, w = torch.randn(*shape, requires_grad=True), torch.randn(shape[-1], requires_grad=True)
    _check(lambda x, w: fused.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (shape[-1],), w, 1e-6), [x, w])


def test_rms_norm_skips_the_weight_gradient_when_frozen():
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32)
    fused.rms_norm(x, w, 1e-5).sum().backward()
    ref = x.detach().requires_grad_()
    F.rms_norm(ref, (32,), w, 1e-5).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (3, 1001), (2, 128, 1024)])
def test_swiglu_matches_silu_times_up(shape):
    torch.manual_seed(len(shape))
    g, u = torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)
    g.data[..., :2] = torch.tensor([-100.0, 100.0])[: g.shape[-1]]  # saturated sigmoids stay finite
    _check(fused.swiglu, lambda g, u: F.silu(g) * u, [g, u])


def _rope_reference(x, cos, sin):
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


@pytest.mark.parametrize(("B", "H", "T", "D", "cos_batch"), [(2, 3, 5, 40, 2), (1, 4, 9, 64, 1), (3, 2, 17, 64, 1)])
def test_rope_matches_the_reference_on_transposed_views(B, H, T, D, cos_batch):
    torch.manual_seed(B * T + D)
    # queries as the attention layer makes them: (B, T, H, D) viewed as (B, H, T, D)
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(cos_batch, 1, T, D), torch.randn(cos_batch, 1, T, D)
    assert fused.rope_applies(q, cos, sin)
    _check(lambda x: fused.rope(x, cos, sin), lambda x: _rope_reference(x, cos.double(), sin.double()), [q])
    assert fused.rope(q, cos, sin).stride() == q.stride()  # the layout SDPA is handed is kept


def test_without_gradients_the_ops_run_without_their_autograd_functions():
    """Under no_grad / inference_mode (decode steps) each op is called directly: the same results as
    through its autograd Function, and no Function in the profile."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 389), torch.randn(389)
    g, u = torch.randn(2, 1001), torch.randn(2, 1001)
    q = torch.randn(2, 5, 3, 64).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D)
    angles = torch.randn(1, 1, 5, 64)
    calls = {
        "_RMSNorm": lambda: fused.rms_norm(x, w, 1e-6),
        "_SwiGLU": lambda: fused.swiglu(g, u),
        "_Rope": lambda: fused.rope(q, angles.cos(), angles.sin()),
    }
    for name, call in calls.items():
        with_grad = call()  # (no input wants a gradient, but grad mode is on: the Function path)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode(), torch.profiler.profile() as prof:
                direct = call()
            assert torch.equal(direct, with_grad), name
            assert name not in {e.key for e in prof.key_averages()}, (name, mode)


@pytest.mark.parametrize("case", ["float64", "angles with a gradient", "odd head size", "cos per head", "disabled"])
def test_what_the_kernels_do_not_cover_is_left_to_torch(case, monkeypatch):
    x, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    if case == "float64":
        x = x.double()
    elif case == "angles with a gradient":
        cos.requires_grad_()
    elif case == "odd head size":
        x, cos, sin = x[..., :7], cos[..., :7], sin[..., :7]
    elif case == "cos per head":
        cos, sin = cos.expand(2, 3, 5, 8), sin.expand(2, 3, 5, 8)
    else:
        monkeypatch.setattr(fused, "enabled", False)
    assert not fused.rope_applies(x, cos, sin)
    assert fused.applies(torch.randn(3)) == (case != "disabled")


def _model_step(cfg: ModelConfig, on: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    monkeypatch.setattr(fused, "enabled", on)
    torch.manual_seed(0)
    model = lmlab.Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.profiler.profile() as prof:
        loss = model(x, targets=x)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, _ops(prof)


@pytest.mark.parametrize("fused_attention", [True, False], ids=["rope in attention", "rope alone"])
@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "chatglm-tiny"])
def test_a_training_step_with_the_kernels_equals_one_without(preset, fused_attention, monkeypatch):
    cfg = ModelConfig.from_preset(preset)
    if not fused_attention:  # too few (batch, kv head) pairs for the attention kernel: SDPA runs
        monkeypatch.setattr(attention, "_threads", lambda: 1 << 20)
    loss, grads, ops = _model_step(cfg, True, monkeypatch)
    ref_loss, ref_grads, ref_ops = _model_step(cfg, False, monkeypatch)
    # every norm, SwiGLU and rotary embedding took its kernel, forward and backward
    n = cfg.n_layer
    assert ops["lmlab::rms_norm"] == ops["lmlab::rms_norm_backward"] == 2 * n + 1
    assert ops["lmlab::swiglu"] == ops["lmlab::swiglu_backward"] == n
    if fused_attention:  # RoPE inside the attention kernel
        assert ops["lmlab::attention"] == ops["lmlab::attention_backward"] == n and "lmlab::rope" not in ops
    else:
        assert ops["lmlab::rope"] == 4 * n and "lmlab::attention" not in ops  # queries and keys, both ways
    assert not ref_ops
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_models_leave_fusion_to_inductor():
    torch.manual_seed(0)
    model = lmlab.Transformer(ModelConfig.from_preset("llama-tiny"))
    x = torch.randint(0, model.cfg.vocab_size, (1, 8))
    compiled = torch.compile(model)
    with torch.profiler.profile() as prof:
        compiled(x)
    # only attention, which inductor does not fuse, stays an lmlab kernel (tests/kernels/test_attention.py)
    assert set(_ops(prof)) <= {"lmlab::attention", "lmlab::attention_backward"}
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_failed_build_falls_back_to_torch_with_a_warning(tmp_path):
    code = (
        "import warnings, torch, lmlab\n"
        "from lmlab.model.config import ModelConfig\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = lmlab.Transformer(ModelConfig.from_preset('llama-tiny'))\n"
        "    x = torch.randint(0, 100, (1, 8))\n"
        "    m(x, targets=x).backward()\n"
        "print(sum('compiling the CPU kernels failed' in str(x.message) for x in w))\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "LMLAB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"  # one warning, then torch's kernels; the step ran
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_gives_the_loss_and_its_gradient_in_place(smoothing):
    torch.manual_seed(1)
    logits = torch.randn(6, 1003) * 30  # large logits: the max is subtracted before exp
    targets, weight = torch.randint(0, 1003, (6,)), torch.rand(6)
    ref = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref, targets, reduction="none", label_smoothing=smoothing)
    (ref_loss * weight.double()).sum().backward()
    scratch = logits.clone()
    torch.testing.assert_close(fused.softmax_cross_entropy_(scratch, targets, None, smoothing).double(), ref_loss)
    assert torch.equal(scratch, logits)  # no row weights: the logits are left alone
    loss = fused.softmax_cross_entropy_(logits, targets, weight, smoothing)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), ref.grad, rtol=1e-5, atol=1e-6)


def test_softmax_cross_entropy_rejects_a_target_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="out of range"):
        fused.softmax_cross_entropy_(torch.randn(2, 10), torch.tensor([3, 10]), None)


AVX2_CHECK = """
import torch, lmlab
from lmlab.generate import cpu_kernels
from lmlab.kernels import attention, build, fused
from lmlab.model.config import ModelConfig
assert build.isa() == "avx2" and build.load() and not cpu_kernels.available()
cfg = ModelConfig.from_preset("llama-tiny")
grads = []
for on in (True, False):
    fused.enabled = on
    torch.manual_seed(0)
    model = lmlab.Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.profiler.profile() as prof:
        model(x, targets=x).backward()
    took = {e.key for e in prof.key_averages() if e.key.startswith("lmlab::")}
    assert took == ({"lmlab::rms_norm", "lmlab::rms_norm_backward", "lmlab::swiglu", "lmlab::swiglu_backward",
                     "lmlab::softmax_xent_", "lmlab::attention", "lmlab::attention_backward"}
                    if on else set()), took
    grads.append([p.grad for p in model.parameters()])
for a, b in zip(*grads):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
print("ok")
"""


def test_the_avx2_build_has_the_fused_ops_and_leaves_decoding_to_torch(tmp_path):
    # what a laptop without AVX-512 gets: built here for AVX2 into a cache of its own
    env = {**os.environ, "LMLAB_KERNELS_ISA": "avx2", "LMLAB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[-1] == "ok", out.stderr[-3000:]


def _bf16_error(fast, reference, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Largest error of fast (bf16 in and out) and of torch's own bf16 ops against float64, relative
    to the largest value."""
    want = reference(*(t.double() for t in inputs))
    got, torch_bf16 = fast(*inputs), reference(*inputs)
    assert got.dtype == torch.bfloat16
    scale = want.abs().max()
    return ((got.double() - want).abs().max() / scale).item(), ((torch_bf16.double() - want).abs().max() / scale).item()


def test_bf16_swiglu_rounds_once():
    torch.manual_seed(3)
    g, u = torch.randn(4, 1001).bfloat16(), torch.randn(4, 1001).bfloat16()
    ours, theirs = _bf16_error(fused.swiglu, lambda g, u: F.silu(g) * u, [g, u])
    assert ours <= 2**-8 and ours <= theirs  # within half a bf16 step of the largest value; torch rounds twice
    # and its gradients, computed in float32 from the bf16 inputs
    a, b = g.clone().requires_grad_(), u.clone().requires_grad_()
    fused.swiglu(a, b).backward(torch.ones(4, 1001, dtype=torch.bfloat16))
    ga, gb = g.double().requires_grad_(), u.double().requires_grad_()
    (F.silu(ga) * gb).sum().backward()
    for got, want in ((a.grad, ga.grad), (b.grad, gb.grad)):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 2**-8


def test_bf16_rope_with_bf16_angles_and_with_float_angles_under_autocast():
    torch.manual_seed(4)
    q = torch.randn(2, 9, 3, 64).transpose(1, 2).bfloat16()
    cos, sin = torch.randn(2, 1, 9, 64), torch.randn(2, 1, 9, 64)
    ours, theirs = _bf16_error(
        lambda x, c, s: fused.rope(x, c, s), _rope_reference, [q, cos.bfloat16(), sin.bfloat16()]
    )
    assert ours <= 2**-8 and ours <= theirs
    # float32 angles: x * cos would promote to float32, so only autocast (which casts the
    # attention's inputs to bf16 anyway) lets the kernel keep the result in bf16
    assert not fused.rope_applies(q, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.rope_applies(q, cos, sin)
        y = fused.rope(q, cos, sin)
    want = _rope_reference(q.double(), cos.double(), sin.double())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs().max() / want.abs().max()).item() <= 2**-8


def test_an_autocast_training_step_takes_the_bf16_kernels(monkeypatch):
    cfg = ModelConfig.from_preset("llama-tiny")
    results = []
    for on in (True, False):
        monkeypatch.setattr(fused, "enabled", on)
        torch.manual_seed(0)
        model = lmlab.Transformer(cfg)
        x = torch.randint(0, cfg.vocab_size, (2, 24))
        with torch.profiler.profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, targets=x)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], _ops(prof)))
    (loss, grads, ops), (ref_loss, ref_grads, ref_ops) = results
    assert ops["lmlab::swiglu"] == ops["lmlab::swiglu_backward"] == cfg.n_layer
    assert ops["lmlab::rope"] == 4 * cfg.n_layer  # bf16 queries and keys: the attention kernel is float32 only
    assert not ref_ops
    # bf16 matmuls either way; the kernels round less often than torch's bf16 ops
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert ((g - r).abs().max() / r.abs().max()).item() < 5e-2


def test_torch_func_transforms_take_torch_ops():
    # functorch's wrapped tensors look like plain tensors; the Functions here have no vmap rule
    norm = lmlab.model.norm.RMSNorm(16, 1e-6)
    x = torch.randn(3, 16)
    params = dict(norm.named_parameters())
    grads = torch.func.grad(lambda p, x: torch.func.functional_call(norm, p, (x,)).sum())(params, x)
    ref = torch.autograd.grad(F.rms_norm(x, (16,), norm.weight, 1e-6).sum(), norm.weight)[0]
    torch.testing.assert_close(grads["weight"], ref)
    torch.testing.assert_close(torch.vmap(norm)(x), F.rms_norm(x, (16,), norm.weight, 1e-6))


def test_an_unwritable_cache_falls_back_with_a_warning(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    code = (
        "import warnings\n"
        "from lmlab.kernels import build\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        '    print(build.load(), sum("can\'t be used" in str(x.message) for x in w))\n'
    )
    env = {**os.environ, "LMLAB_CACHE": str(blocked)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1"]
