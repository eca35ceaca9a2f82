"""`lmlab quantize`: a model's linear layers to int8 or int4, by round-to-nearest or GPTQ.

The quantized model is an ordinary Transformer whose nn.Linear layers became QuantLinear
(model/quantized.py); `save_pretrained` writes it and `load_pretrained` reads it back. The
embedding stays float32 (a lookup reads one row per token); a head tied to it is given its own
quantized copy, as llama.cpp does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.compress.gptq import calibration_batches, gptq_quantize_model
from lmlab.compress.rtn import quantize_rtn
from lmlab.errors import LmlabError
from lmlab.model.quantized import (
    QuantConfig,
    QuantLinear,
    attach_config,
    quantizable,
    quantized_bytes,
    replace_linear,
    untie_head,
)

METHODS = ("rtn", "gptq")

# how far int24 activations may move a probe's logits (max |diff| / max |logit|) before the default
# gives way to float32: SmolLM2 measures 3.8e-6 (`lmlab quantize` prints it); a model whose weights ignore
# its few huge activation dimensions would measure far more (docs/compress.md)
INT24_TOLERANCE = 1e-4


@torch.no_grad()
def quantize_rtn_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Every layer `quantizable` names, rounded to the nearest code (in place)."""
    for name, m in quantizable(model, config):  # every width checked before any layer changes
        config.groups(m.in_features, name)
    untie_head(model)
    for name, m in quantizable(model, config):
        replace_linear(model, name, m, quantize_rtn(m.weight.detach().float().cpu(), config, name))
    attach_config(model, config)
    return model


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Quantize `model` in place by config.method; GPTQ needs `calibration` batches of token ids.
    Returns GPTQ's per-layer error relative to round-to-nearest (empty for RTN)."""
    if getattr(model, "quant_config", None) is not None:
        raise LmlabError("this model is already quantized")
    model.float()
    if config.method == "rtn":
        quantize_rtn_model(model, config)
        return {}
    if config.method == "gptq":
        if not calibration:
            raise LmlabError("GPTQ needs calibration text (--calib)", field="calib")
        return gptq_quantize_model(model, calibration, config)
    raise LmlabError(f"unknown method {config.method!r} (choose from {', '.join(METHODS)})", field="method")


@torch.no_grad()
def int24_error(model: nn.Module, tokens: int = 256, seed: int = 0) -> float | None:
    """max |logit difference| / max |logit| between int24 and float32 activations over `tokens` random
    token ids (a long prefill: the integer path's case; fewer where the model's context is shorter);
    None where that path would not run here (no VNNI, a GPU: the device policy; a context too short
    for a prefill over its row threshold). NaN where a logit is not finite in one path only. The
    layers' settings and the model's train/eval mode are left as they were."""
    from lmlab.utils.device import policy

    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.activations == "int24"]
    device = next(model.parameters()).device
    rows = policy(device).int8_prefill_rows
    tokens = min(tokens, model.cfg.max_seq_len)
    if not layers or rows is None or tokens <= rows:
        return None
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=g).to(device)
    logits, training = {}, model.training
    try:
        model.eval()
        for activations in ("float32", "int24"):
            for m in layers:
                m.activations = activations
            logits[activations] = model(ids)[0].float()
    finally:
        model.train(training)
        for m in layers:
            m.activations = "int24"
    exact, got = logits["float32"], logits["int24"]
    finite = exact.isfinite()  # (a reduced head's logits are -inf off its tokens, in both paths)
    if not torch.equal(finite, got.isfinite()):
        return float("nan")
    return float((got[finite] - exact[finite]).abs().max() / exact[finite].abs().max())


def calibration_texts(source: str, n_chars: int) -> list[str]:
    """Texts for calibration: registered corpus names (fetched; their train splits) or .txt/.jsonl files,
    comma-separated to mix several (an equal share of characters from each)."""
    from lmlab.data.readers import iter_texts
    from lmlab.data.registry import DATASETS, fetch

    sources = [s for s in source.split(",") if s]
    texts = []
    for name in sources:
        path = fetch(name) / "train.jsonl" if name in DATASETS else Path(name)
        if not path.exists():
            raise LmlabError("no such calibration file or corpus name", file=str(path), field="calib")
        total = 0
        for t in iter_texts([path]):
            texts.append(t)
            total += len(t)
            if total >= n_chars // len(sources):
                break
    return texts


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "rtn",
    bits: int = 8,
    group_size: int | None = None,
    sym: bool | None = None,
    desc_act: bool = False,
    calib: str = "kjv",
    calib_samples: int = 128,
    calib_len: int = 512,
    activations: str | None = None,
) -> dict[str, float]:
    """Load `src`, quantize it, write `out`; sizes before and after (MB) and GPTQ's error ratio."""
    from lmlab.model.checkpoint import load_pretrained, save_pretrained

    if bits not in (4, 8):
        raise LmlabError(f"--bits must be 8 or 4, not {bits}", field="bits")
    config = QuantConfig(
        bits=bits,
        group_size=group_size if group_size is not None else (32 if bits == 4 else None),
        sym=sym if sym is not None else bits == 8,
        method=method,
        desc_act=desc_act,
        activations=activations,
    )
    model, tokenizer = load_pretrained(src)
    for name, m in quantizable(model, config):  # a width the group does not divide: say so before any work
        config.groups(m.in_features, name)
    before = quantized_bytes(model)
    calibration = None
    if method == "gptq":
        if tokenizer is None:
            raise LmlabError("GPTQ calibration needs the model's tokenizer", file=str(src))
        texts = calibration_texts(calib, calib_samples * calib_len * 8)
        calibration = calibration_batches(tokenizer, texts, calib_samples, calib_len)
    ratios = quantize_model(model, config, calibration)
    summary = {"size_mb_before": before / 1e6, "size_mb_after": quantized_bytes(model) / 1e6}
    if config.activations == "int24":
        # the default's safety net: a model whose prefill int24 moves too far keeps float32 activations
        # (asked for by name, int24 stays, and the figure is reported)
        err = int24_error(model)
        summary["int24_logit_error"] = float("nan") if err is None else err
        summary["int24_checked"] = float(err is not None)
        if err is not None and not err <= INT24_TOLERANCE and activations is None:  # (NaN: not within it)
            attach_config(model, dataclasses.replace(config, activations="float32"))
            summary["activations_fallback"] = 1.0
    save_pretrained(model, tokenizer, out)
    if ratios:
        summary["gptq_error_vs_rtn_median"] = float(torch.tensor(list(ratios.values())).median())
    return summary
