"""Causal (or unmasked) attention for training on the CPU: lmlab's C++ kernel, in eager and compiled code.

`F.scaled_dot_product_attention` on the CPU runs ATen's flash attention, whose backward reaches
well under half the GEMM peak at the sizes a small model trains with (T = 256, head_dim = 64):
attention was ~11% of a compiled training step of llama-17m, more than its share of the FLOPs.
csrc/attention.cpp does the same work in blocks of 64 queries, each block's scores one GEMM into a
buffer that stays in cache, and only each row's log-sum-exp saved for the backward; see that file.

Unlike the fused elementwise ops (fused.py), this one also runs under torch.compile: it is a
registered operator with a fake (shape) implementation and an autograd formula, which inductor
calls as an external kernel, as it would ATen's. `applies()` says when the model may use it;
LMLAB_FUSED_KERNELS=0 or `fused.enabled = False` turns it off with the rest.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd import forward_ad

from lmlab.kernels import build, fused


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """Builds and loads the kernels and registers the operator's fake and autograd parts, once;
    a constant to torch.compile, so checking it costs a compiled graph nothing."""
    return _register()


@torch.compiler.assume_constant_result
def _threads() -> int:
    return torch.get_num_threads()


@functools.cache
def _register() -> bool:
    if not build.has("attention"):
        return False
    torch.library.register_fake("lmlab::attention")(_attention_fake)
    torch.library.register_fake("lmlab::attention_backward")(_backward_fake)
    torch.library.register_autograd("lmlab::attention", _backward, setup_context=_setup_context)
    torch.library.register_autograd("lmlab::attention_backward", _no_double_backward, setup_context=_no_context)
    return True


def _no_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward(ctx, *grads):
    # without this, autograd would treat the backward as a constant: second derivatives silently zero
    raise RuntimeError(
        "lmlab's CPU attention kernel has no second derivative; set LMLAB_FUSED_KERNELS=0 "
        "(or lmlab.kernels.fused.enabled = False) to train with double backward on torch's ops"
    )


def _projection_layout(like: torch.Tensor, B: int, H: int, T: int, D: int) -> torch.Tensor:
    # the kernel returns (B, H, T, D) views of (B, T, H, D) memory; shapes and strides must agree
    return like.new_empty(B, T, H, D).transpose(1, 2)


def _attention_fake(q, k, v, cos, sin, causal, scale):
    B, H, T, D = q.shape
    return _projection_layout(q, B, H, T, D), q.new_empty(B, H, T)


def _backward_fake(grad, q, k, v, cos, sin, out, lse, causal, scale):
    B, H, T, D = q.shape
    _, Hkv, S, _ = k.shape
    return _projection_layout(q, B, H, T, D), _projection_layout(k, B, Hkv, S, D), _projection_layout(v, B, Hkv, S, D)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cos, sin, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1 or grad_out.stride(-2) < grad_out.shape[-1]:
        # a fresh copy, not .contiguous(): that keeps a size-1 dim's odd stride, which BLAS refuses
        grad_out = torch.empty(grad_out.shape, dtype=grad_out.dtype).copy_(grad_out)
    dq, dk, dv = torch.ops.lmlab.attention_backward(grad_out, q, k, v, cos, sin, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


def applies(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool,
    masked: bool,
    dropout: float,
) -> bool:
    """Whether `attention` takes these: float32 CPU q (B, H, T, D) and k, v (B, Hkv, S, D), rows of
    D contiguous, no mask and no dropout, causal only where T == S, and at least as many (batch,
    key/value head) pairs as threads (the backward's unit of parallel work; with fewer, ATen's
    kernel, which splits finer, is faster); rotary angles, if any, float32 (B or 1, 1, T, D) for
    as many keys as queries, wanting no gradient; plain tensors in eager code (see
    `fused.applies`), or any under torch.compile."""
    if not fused.enabled or masked or dropout > 0.0 or forward_ad._current_level >= 0:
        return False  # (forward-mode AD: the operator has no forward derivative)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or (causal and q.shape[2] != k.shape[2]):
        return False
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        return False  # SDPA also broadcasts a batch of 1 and takes a value size of its own; not this kernel
    if q.shape[0] * k.shape[1] < _threads() or 0 in (q.shape[2], k.shape[2], q.shape[3]):
        return False
    tensors = (q, k, v) if rope is None else (q, k, v, *rope)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 for t in tensors):
        return False
    if any(t.stride(-2) < t.shape[-1] for t in (q, k, v)):  # rows that overlap (a size-1 dim's stride)
        return False
    if rope is not None and not _angles_fit(q, k, *rope):
        return False
    if torch.compiler.is_compiling():
        return _ready()
    return fused.applies(*tensors) and _ready()


def _angles_fit(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    B, _, T, D = q.shape
    return (
        cos.dim() == 4
        and cos.shape[0] in (1, B)
        and cos.shape[1:] == (1, T, D)
        and k.shape[2] == T
        and D % 2 == 0
        and sin.shape == cos.shape
        and sin.stride() == cos.stride()
        and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)` with the default
    scale, on lmlab's kernel; with `rope` (cos, signed sin, as `model.rope.apply_rope` takes them),
    q and k are rotated first. Check `applies` first. The result is a (B, H, T, D) view of
    (B, T, H, D) memory, so `.transpose(1, 2).reshape(B, T, H * D)` is free."""
    if not _ready():
        raise RuntimeError("lmlab's CPU attention kernel is not available here (see lmlab.kernels.build)")
    cos, sin = rope if rope is not None else (None, None)
    return torch.ops.lmlab.attention(q, k, v, cos, sin, causal, q.shape[-1] ** -0.5)[0]
