"""CPU kernels for decode steps: weight matmuls with few rows, and single-query attention.

A decode step feeds one token per sequence through the model. Its matmuls have as many rows as
the batch, so their speed is how fast the weights stream from memory; BLAS is tuned for large
matrices (at 8 rows MKL reads SmolLM2's weights at about 11 GB/s on a 2-core Xeon, a third of what
the memory gives). Its attention has one query per head, where torch's CPU flash attention spends
most of its time setting up tiles. Two small C++ operators do these directly:

- `lmlab::skinny_linear` (kernels/csrc/skinny_matmul.cpp): y = x Wᵀ + b for up to `LINEAR_MAX_ROWS` rows of x,
  reading each weight row once for all rows and prefetching ahead.
- `lmlab::decode_attention` (kernels/csrc/decode_attention.cpp): one query per (sequence, head), grouped
  heads, a boolean or additive mask.

They are C++ in `kernels/csrc/`, built at first use by `lmlab.kernels.build` (cached under
~/.cache/lmlab). Where they cannot run (another CPU, no compiler,
a GPU tensor, a shape they do not cover) `linear` and `attention` are torch's own functions, so
callers never need to check. Within `DecodeKernels()` every eligible `F.linear` (nn.Linear
included) and `F.scaled_dot_product_attention` call takes them, eagerly or under torch.compile,
whose compiled graph calls the operators directly.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lmlab.kernels import build
from lmlab.utils.device import policy

LINEAR_MAX_ROWS = 64
"""Up to this many rows `linear` takes the kernel, which reads each weight row once for all of them. In
a model the weights stream from memory, and MKL's small-M products (which pack each weight first) lost
to it up to 96 rows in a float32 SmolLM2 prefill (1.2-1.5x from 17 to 64 rows; 0.92x at 128:
`benchmarks/prefill_rows.py`), though a single product with its weight warm in cache times level at
16-32 rows. Past this, BLAS."""
MAX_ROWS = 16
"""Up to this many queries of one sequence `attention` takes the decode kernel (below)."""


@functools.cache
def _load() -> bool:
    if not (build.has("skinny_linear") and build.has("decode_attention")):
        return False  # not built here, or an AVX2 build (these are AVX-512 code)
    _register_fakes()
    return True


def _register_fakes() -> None:
    # output shapes for torch.compile's tracing; the operators themselves come from the library
    @torch.library.register_fake("lmlab::skinny_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("lmlab::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)


enabled = os.environ.get("LMLAB_DECODE_KERNELS", "1") != "0"
"""LMLAB_DECODE_KERNELS=0 turns the kernels off (torch's own kernels run instead). Under
torch.compile the setting is read once, when a graph is traced."""


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing, not traced
def available() -> bool:
    """Whether the kernels run on this machine (compiling them on first call) and are enabled."""
    return enabled and _load()


def _plain(*tensors: torch.Tensor | None) -> bool:
    """float32 CPU tensors from which no gradient is wanted (the operators have no backward)."""
    grad = torch.is_grad_enabled()
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad))
        for t in tensors
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by `lmlab::skinny_linear` where x has at most `LINEAR_MAX_ROWS` rows."""
    if (
        x.dim() >= 1
        and weight.dim() == 2
        and weight.shape[0] >= 2
        and weight.is_contiguous()
        and 0 < x.numel() // max(x.shape[-1], 1) <= LINEAR_MAX_ROWS
        and _plain(x, weight, bias)
        and available()
    ):
        return torch.ops.lmlab.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, by `lmlab::decode_attention` where there is one query per
    head (B, H, 1, D), or a few queries of one sequence (1, H, T, D) with T <= `MAX_ROWS` (a
    speculative check, a short prompt after a cached one), and nothing it does not cover (dropout,
    is_causal)."""
    T = q.shape[2] if q.dim() == 4 else 0
    if (
        q.dim() == k.dim() == v.dim() == 4
        and (T == 1 or (1 < T <= MAX_ROWS and q.shape[0] == 1))
        and dropout_p == 0.0
        and not is_causal
        and (enable_gqa or q.shape[1] == k.shape[1])
        and k.stride(-1) == v.stride(-1) == 1
        and (attn_mask is None or (attn_mask.dim() == 4 and attn_mask.shape[2] in (1, T)))
        and (T == 1 or attn_mask is None or (attn_mask.shape[0] == 1 and attn_mask.shape[3] == k.shape[2]))
        and (attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32))
        and _plain(q, k, v)
        and available()
    ):
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        if T == 1:
            return torch.ops.lmlab.decode_attention(q, k, v, attn_mask, scale)
        # T queries of one sequence as a batch of T one-query rows over the same keys (a zero batch
        # stride, nothing copied), each with its own row of the mask: torch's flash attention spends
        # ~4x longer setting up tiles for so few queries (5 queries, 200 keys)
        rows = (T, *k.shape[1:])
        # (a mask row per query, or one row for all: the kernel broadcasts a batch of 1)
        mask = attn_mask.transpose(0, 2) if attn_mask is not None and attn_mask.shape[2] == T else attn_mask
        out = torch.ops.lmlab.decode_attention(q.transpose(0, 2), k.expand(rows), v.expand(rows), mask, scale)
        return out.transpose(0, 2)  # (1, H, T, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


class DecodeKernels(TorchFunctionMode):
    """Within this context, `F.linear` (so nn.Linear) and `F.scaled_dot_product_attention` take the
    decode kernels wherever they apply."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def for_rows(rows: int, device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """The context for an eager forward over `rows` rows (sequences, beams, or tokens of one
    sequence) on `device`: `DecodeKernels()` on a CPU, at any number of rows. The mode costs about
    1 us on every torch call of the forward (~1 ms a SmolLM2 step); at one row the kernels save far
    more than that here: MKL's one-row products on this AMD CPU stream the weights at a third of
    the kernel's rate (eager batch-1 decode of SmolLM2: 18.6 tok/s without, 32.7 with; measured
    side by side on a quiet 2-core machine, 2026-12-04). On a GPU the kernels never apply (the device
    policy says so, so no GPU step pays for the mode). Compiled graphs enter the mode themselves
    (decode._forward), where it is traced away."""
    if not policy(device).cpu_kernels or rows < 1:
        return contextlib.nullcontext()
    return DecodeKernels()
