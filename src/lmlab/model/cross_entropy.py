"""Cross-entropy of a linear head without its logits: the vocabulary projection and the loss, chunk by chunk.

A language model's loss needs logits of (tokens x vocabulary) floats: 67 MB for 2,048 tokens of an
8k vocabulary, 400 MB at 49k, and autograd keeps that tensor, its log-softmax and their gradients
alive. Here the tokens are taken a few hundred at a time: each chunk's logits are made, turned into
the loss and, in place, into the gradient of the loss (softmax minus the target distribution), and
that gradient is pushed through the projection at once. Only the gradients of the hidden states
and of the weight are kept for backward. Less memory traffic makes it faster on a CPU too; the
results equal F.cross_entropy(F.linear(h, weight, bias), targets) to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmlab.kernels import fused
from lmlab.utils.device import loss_chunk_rows, policy


def chunk_rows(vocab_size: int, device: str | torch.device | None = None) -> int:
    """Tokens per chunk: on a CPU about 8 MB of fp32 logits (at least 64 rows so the matmuls stay
    efficient); on a GPU a few large chunks (utils/device.py holds both budgets)."""
    return loss_chunk_rows(vocab_size, device)


def _softmax_cross_entropy_(
    logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Per-row losses of logits (rows, V) against targets (rows,), and with row weights w the
    gradient of sum(w * loss) in place of the logits: `fused.softmax_cross_entropy_` in torch's ops."""
    V, tc = logits.shape[1], targets[:, None]
    picked = logits.gather(1, tc).squeeze(1)
    average = logits.mean(-1) if eps else None
    top = logits.amax(-1, keepdim=True)
    p = logits.sub_(top).exp_()  # unnormalized softmax, in place: few passes over the chunk
    z = p.sum(-1)
    lse = top.squeeze(1) + z.log()
    loss = lse - picked
    if eps:
        # PyTorch's smoothing: (1 - eps) * nll + eps * mean over classes of -log p
        loss = (1 - eps) * loss + eps * (lse - average)
    if w is not None:
        # d(loss)/d(logits) per row: (softmax - (1 - eps) * onehot - eps / V) * row weight
        p.mul_((w / z)[:, None])
        if eps:
            p.sub_((w * (eps / V))[:, None])
        p.scatter_add_(1, tc, (w * (eps - 1.0))[:, None].to(p.dtype))
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when needed, the gradients; backward only scales them."""

    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        targets,
        ignore_index: int,
        label_smoothing: float,
        rows: int,
        mean: bool,
        dtype,
        out_dtype,
    ):
        h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        valid = t != ignore_index
        count = valid.sum()
        # the mean is over the tokens that carry a loss
        # row weights in float32 whatever the default dtype
        scale = 1.0 / count.clamp(min=1).float() if mean else torch.ones((), dtype=torch.float32, device=h.device)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want_grad = want_h or want_w or want_b
        # the matmuls run in `dtype` (autocast's, say); the softmax and the sums in float32
        hm, wm = h2.to(dtype), weight.to(dtype)
        bm = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h2) if want_h else None
        # written by the first chunk's matmul, added to by the rest (no pass to zero it first)
        grad_w = (torch.empty_like if h2.shape[0] else torch.zeros_like)(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # ignored rows pick class 0, then get weight 0; any other bad target reaches the range check
        safe = torch.where(valid, t, 0)
        eps = label_smoothing
        # one buffer for every chunk's logits: a fresh 8 MB tensor per chunk costs page faults
        buf = hm.new_empty(min(rows, h2.shape[0]), weight.shape[0])
        # the loss, and the logits (float32, like `total`) turned into their gradient in place: one
        # C++ pass per row where the kernels run, torch's ops elsewhere
        xent = fused.softmax_cross_entropy_ if fused.applies(total) else _softmax_cross_entropy_
        for s in range(0, h2.shape[0], rows):
            hc, tc, vc = hm[s : s + rows], safe[s : s + rows, None], valid[s : s + rows]
            out = buf[: hc.shape[0]]
            if bm is None:
                logits = torch.mm(hc, wm.t(), out=out).float()  # (rows, V)
            else:
                logits = torch.addmm(bm, hc, wm.t(), out=out).float()
            w = vc * scale if want_grad else None  # each row's weight in the loss
            total += torch.where(vc, xent(logits, tc.squeeze(1), w, eps), 0.0).sum()
            if not want_grad:
                continue
            grad = logits.to(dtype)
            if want_h:
                if grad_h.dtype == dtype:
                    torch.mm(grad, wm, out=grad_h[s : s + rows])
                else:
                    grad_h[s : s + rows] = torch.mm(grad, wm)
            if want_w:
                if grad_w.dtype == dtype:
                    grad_w.addmm_(grad.t(), hc, beta=1.0 if s else 0.0)
                else:  # summed over chunks in the weight's own precision
                    part = torch.mm(grad.t(), hc)
                    grad_w.copy_(part) if s == 0 else grad_w.add_(part)
            if want_b:
                grad_b += logits.sum(0).to(grad_b.dtype)
        ctx.h_shape = h.shape
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        # no token to average: NaN, as F.cross_entropy gives (a sum is 0)
        return (total / count if mean else total).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # out of place: a second backward (retain_graph) must find the saved gradients unscaled
        return (
            None if grad_h is None else (grad_h * g).view(ctx.h_shape),
            None if grad_w is None else grad_w * g,
            None if grad_b is None else grad_b * g,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # a loop of in-place chunk updates: eager code, called from compiled CPU models too
def _eager_linear_cross_entropy(h, weight, bias, targets, ignore_index, label_smoothing, rows, mean):
    device = h.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    out_dtype = torch.float32 if autocast else h.dtype  # as autocast's F.cross_entropy gives
    with torch.autocast(device, enabled=False):  # the casts are explicit inside
        return _LinearCrossEntropy.apply(
            h, weight, bias, targets, ignore_index, label_smoothing, rows, mean, dtype, out_dtype
        )


def _chunk_loss_sum(h, weight, bias, targets, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")


def traceable_linear_cross_entropy(
    h, weight, bias, targets, ignore_index: int, label_smoothing: float, rows: int, mean: bool
) -> torch.Tensor:
    """The same loss in plain torch ops that torch.compile traces into the step's graph (no graph break):
    a few large chunks, each recomputed in backward (activation checkpointing) so that only one chunk's
    logits live at a time. The compiled GPU path: there, a graph break and a Python loop of small
    chunks cost more than the recomputed matmul."""
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    n = h2.shape[0]
    if n <= rows:
        total = _chunk_loss_sum(h2, weight, bias, t, ignore_index, label_smoothing)
    else:
        total = sum(
            checkpoint(
                _chunk_loss_sum, h2[s : s + rows], weight, bias, t[s : s + rows], ignore_index, label_smoothing,
                use_reentrant=False,
            )
            for s in range(0, n, rows)
        )  # fmt: skip
    if not mean:
        return total
    return total / (t != ignore_index).sum()  # no token to average: NaN, as F.cross_entropy gives


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    rows: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of F.linear(h, weight, bias) (..., V) against targets (...), computed in chunks
    of `rows` tokens without materializing the logits; targets == ignore_index carry no loss.
    reduction "mean" averages over the counted tokens, "sum" adds them up. Under autocast the matmuls
    run in autocast's dtype (as nn.Linear's would) and the softmax in float32.

    The chunk size and, under torch.compile, the path come from the device policy: compiled on a GPU,
    the loss is traced into the graph; elsewhere it runs the eager chunk loop (fused C++ on a CPU)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    rows = rows or chunk_rows(weight.shape[0], h.device)
    mean = reduction == "mean"
    if torch.compiler.is_compiling() and policy(h.device).trace_loss:
        return traceable_linear_cross_entropy(h, weight, bias, targets, ignore_index, label_smoothing, rows, mean)
    return _eager_linear_cross_entropy(h, weight, bias, targets, ignore_index, label_smoothing, rows, mean)
