"""GPTQ (Frantar et al., 2022): quantize a layer's weights one column at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's squared output error, so the layer's outputs on real inputs move as little as possible.

For a linear layer y = x Wᵀ the Hessian of ||x Wᵀ - x Ŵᵀ||² in any row of W is H = 2 Σ x xᵀ over
calibration inputs x. Columns are taken in blocks of 128: inside a block the error is spread
column by column (O(rows x block²)), and onto later blocks once per block as one matmul. With
act-order (desc_act) columns go in order of decreasing diag(H), the most-used inputs first; the
groups keep their places along the row ("static groups"), so the packed layout does not change.

`gptq_quantize_model` runs the decoder one block at a time over the calibration set: it records
each block's linear inputs, quantizes the block, then feeds the block's *quantized* outputs to the
next, so later layers correct for the error of earlier ones; the LM head comes last.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn as nn

from lmlab.compress.rtn import dequantize_with, group_params, quantize_with
from lmlab.errors import LmlabError
from lmlab.kernels import quant
from lmlab.model.quantized import QuantConfig, attach_config, quantizable, replace_linear, untie_head
from lmlab.utils.progress import progress_bar

BLOCK_COLUMNS = 128


class Hessian:
    """Running 2/n Σ x xᵀ of one layer's inputs (float64 sums: millions of tokens add up)."""

    def __init__(self, width: int) -> None:
        self.h = torch.zeros(width, width, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.h += x.T @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return (2 / max(self.n, 1)) * self.h


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, damp: float = 0.01, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and its (in, in) Hessian -> (qweight, scales, offsets) as quantize_rtn returns."""
    rows, cols = w.shape
    groups = config.groups(cols, name)
    g = cols // groups
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    # static groups: each group's scale/offset from the weights before any update (needed with
    # act-order, where a group's columns are not visited together)
    scale, offset = group_params(W.reshape(rows * groups, g), config.bits, config.sym)
    scale, offset = scale.reshape(rows, groups).double(), offset.reshape(rows, groups).double()
    perm = torch.argsort(torch.diag(H), descending=True) if config.desc_act else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    # the upper Cholesky factor of H⁻¹: row i holds the update of columns > i when column i is fixed
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    for i1 in range(0, cols, BLOCK_COLUMNS):
        i2 = min(i1 + BLOCK_COLUMNS, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            group = int(perm[i1 + i]) // g
            s, o = scale[:, group], offset[:, group]
            c = quantize_with(col, s, o, config.bits, config.sym)
            codes[:, i1 + i] = c.to(torch.int16)
            e = (col - dequantize_with(c, s, o).double()) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]  # back to the weights' own column order
    scales = scale.float().contiguous()
    if config.bits == 8:
        return codes.to(torch.int8).contiguous(), scales, None
    return quant.pack_int4(codes), scales, offset.float().contiguous()


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) / 2: the summed squared output error over the calibration inputs per token."""
    d = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d) / 2)


class _Stop(Exception):
    pass


def _block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering layers[0] for each calibration batch, and the keyword arguments
    the blocks are called with (rotary tables, mask)."""
    inputs, kwargs = [], []

    def grab(module, args, kw):
        inputs.append(args[0])
        kwargs.append(kw)
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(ids)
    finally:
        handle.remove()
    return inputs, kwargs


def _record(modules: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, Hessian]:
    """Hessians of each module's inputs over what `run` feeds them."""
    hessians = {name: Hessian(m.in_features) for name, m in modules.items()}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: hessians[name].add(args[0]))
        for name, m in modules.items()
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return hessians


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module, batches: list[torch.Tensor], config: QuantConfig, damp: float = 0.01
) -> dict[str, float]:
    """Quantize every linear layer `quantizable` names with GPTQ, in place, calibrating on `batches`
    of token ids (B, T) (equal T). Returns each layer's output error relative to round-to-nearest's
    on the same inputs (below 1: GPTQ did better)."""
    from lmlab.compress.rtn import quantize_rtn

    model.eval()
    untie_head(model)
    targets = dict(quantizable(model, config))
    xs, kwargs = _block_inputs(model, batches)
    ratios: dict[str, float] = {}

    def quantize(mods: dict[str, nn.Linear], hessians: dict[str, Hessian]) -> None:
        for name, m in mods.items():
            H = hessians[name].value()
            q = gptq_quantize(m.weight.detach().float(), H, config, damp, name)
            w = m.weight.detach().float()
            w_gptq = _dequant(q)
            w_rtn = _dequant(quantize_rtn(w, config, name))
            ratios[name] = layer_error(w, w_gptq, H) / max(layer_error(w, w_rtn, H), 1e-30)
            replace_linear(model, name, m, q)

    bar = progress_bar(total=len(model.layers) + 1, desc="GPTQ", unit="layer")
    for i, block in enumerate(model.layers):
        mods = {n: m for n, m in targets.items() if n.startswith(f"layers.{i}.")}
        hessians = _record(mods, functools.partial(_run_block, block, xs, kwargs))
        quantize(mods, hessians)
        xs = [block(x, **kw) for x, kw in zip(xs, kwargs)]  # through the quantized block: the next one sees its error
        bar.update(1)
    if "lm_head" in targets:
        final = [model.norm(x) if model.norm is not None else x for x in xs]
        quantize({"lm_head": targets["lm_head"]}, {"lm_head": _hessian_of(final)})
    bar.update(1)
    bar.close()
    attach_config(model, config)
    return ratios


def _run_block(block: nn.Module, xs: list[torch.Tensor], kwargs: list[dict]) -> None:
    for x, kw in zip(xs, kwargs):
        block(x, **kw)


def _hessian_of(xs: list[torch.Tensor]) -> Hessian:
    h = Hessian(xs[0].shape[-1])
    for x in xs:
        h.add(x)
    return h


def _dequant(q: tuple) -> torch.Tensor:
    qweight, scales, offsets = q
    if offsets is None:
        return quant.dequantize_int8(qweight, scales)
    return quant.dequantize_int4(qweight, scales, offsets)


def calibration_batches(tokenizer, texts: list[str], n: int, length: int, batch: int = 8) -> list[torch.Tensor]:
    """`n` windows of `length` tokens spread evenly over the concatenated `texts` (so every source of a
    mix is sampled), in batches of `batch`."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
    n = min(n, len(ids) // length)
    if n == 0:
        raise LmlabError(f"the calibration texts hold fewer than {length} tokens", field="calib")
    step = len(ids) // n  # >= length
    windows = torch.tensor([ids[i * step : i * step + length] for i in range(n)])
    return [windows[i : i + batch] for i in range(0, n, batch)]
