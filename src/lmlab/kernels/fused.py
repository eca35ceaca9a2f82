"""Fused CPU kernels for the elementwise parts of a Transformer: RMSNorm, SwiGLU and RoPE.

In eager PyTorch each of these is several passes over memory: RMSNorm's forward is pow, mean,
rsqrt and two multiplies, and its backward ten more; SwiGLU is silu and a multiply, then two
multiplies and silu_backward; RoPE is a multiply, a roll and an addcmul each way. On a small
model these passes, not the matmuls, are what separates a CPU training step from the GEMM bound.
Here each is one C++ pass forward and one backward (csrc/rms_norm.cpp, swiglu.cpp, rope.cpp),
wrapped in an autograd Function (called directly where no gradient is wanted: a decode step makes
~120 of these calls, and the Function's Python machinery costs more than the ops themselves).

The model's own modules (model/norm.py, mlp.py, rope.py) keep the reference math and take these
only where `applies()` says so: float32 CPU tensors, eager mode (under torch.compile, inductor
fuses the same ops itself), and the kernels built (see build.py). LMLAB_FUSED_KERNELS=0 or
`fused.enabled = False` turns them off. Results equal the reference to float rounding.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from lmlab.kernels import build

enabled = os.environ.get("LMLAB_FUSED_KERNELS", "1") != "0"
"""Whether the model's modules use the fused kernels where they apply."""


def applies(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether the fused kernels take these tensors: plain CPU tensors (not under a torch.func
    transform) of one of `dtypes` (float32 for all ops; swiglu and rope also take bfloat16), outside
    torch.compile, with the kernels built (the first call builds them)."""
    if not enabled or torch.compiler.is_compiling():
        return False
    for t in tensors:
        # plain tensors only: a subclass (a DTensor, a fake tensor) has its own dispatch to keep
        if t.device.type != "cpu" or t.dtype not in dtypes or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):  # torch.func transforms: torch's ops
            return False
    return build.load()


def _require() -> None:
    if not build.load():
        raise RuntimeError("lmlab's CPU kernels are not available here (see lmlab.kernels.build)")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = torch.ops.lmlab.rms_norm(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        want_dw = ctx.needs_input_grad[1]
        dx, dw = torch.ops.lmlab.rms_norm_backward(g.reshape(x2.shape).contiguous(), x2, weight, rstd, want_dw)
        return dx.view(g.shape), dw if want_dw else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (C,), weight, eps)` for x (..., C), fused; check `applies(x, weight)` first."""
    _require()
    if not torch.is_grad_enabled():  # inference: the op itself (an autograd Function costs ~25 us a call)
        y, _ = torch.ops.lmlab.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps)
        return y.view(x.shape)
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return torch.ops.lmlab.swiglu(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.lmlab.swiglu_backward(g.to(gate.dtype).contiguous(), gate, up)


SWIGLU_DTYPES = (torch.float32, torch.bfloat16)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` for tensors of one shape and dtype, float32 or bfloat16 (computed in
    float32, rounded once), fused; check `applies(gate, up, dtypes=SWIGLU_DTYPES)` first."""
    _require()
    if not torch.is_grad_enabled():
        return torch.ops.lmlab.swiglu(gate.contiguous(), up.contiguous())
    return _SwiGLU.apply(gate, up)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, signed_sin)
        ctx.dtype = x.dtype
        return torch.ops.lmlab.rope(x, cos, signed_sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        cos, signed_sin = ctx.saved_tensors
        g = g.to(ctx.dtype)
        return torch.ops.lmlab.rope(g if g.stride(-1) == 1 else g.contiguous(), cos, signed_sin, True), None, None


def rope_applies(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether `rope` takes these: x (B, H, T, D) and cos, sin (B or 1, 1, T, D) laid out alike,
    rows of D contiguous, no gradient wanted for the angles, and `applies`. float32 throughout, or
    bfloat16 x with angles of its dtype, or (under autocast, whose attention casts the result to
    bfloat16 anyway) with float32 angles: the result then stays bfloat16 where x * cos would promote."""
    B, _, T, D = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    mixed = x.dtype == torch.bfloat16 and cos.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
    return (
        x.dim() == cos.dim() == 4
        and cos.shape[1:] == (1, T, D)
        and cos.shape[0] in (1, B)
        and D % 2 == 0
        and signed_sin.shape == cos.shape
        and signed_sin.stride() == cos.stride()
        and signed_sin.dtype == cos.dtype
        and (cos.dtype == x.dtype or mixed)
        and x.stride(-1) == cos.stride(-1) == 1
        and not (torch.is_grad_enabled() and (cos.requires_grad or signed_sin.requires_grad))
        and applies(x, cos, signed_sin, dtypes=(torch.float32, torch.bfloat16))
    )


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`model.rope.apply_rope`, fused; check `rope_applies` first."""
    _require()
    if not torch.is_grad_enabled():
        return torch.ops.lmlab.rope(x, cos, signed_sin, False)
    return _Rope.apply(x, cos, signed_sin)


def softmax_cross_entropy_(
    logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-row cross-entropy of logits (rows, V) against targets (rows,) in [0, V), with PyTorch's
    label smoothing. With `row_weight` (rows,), the logits are overwritten with the gradient of
    sum(row_weight * loss) with respect to them; without, they are left alone. Check `applies` first."""
    _require()
    return torch.ops.lmlab.softmax_xent_(logits, targets, row_weight, label_smoothing)
