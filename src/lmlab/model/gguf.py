"""GGUF files (llama.cpp, Ollama): dequantize to a Transformer, rebuild the tokenizer from metadata."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.tokenizer.gguf import gguf_field as _field
from lmlab.tokenizer.gguf import open_gguf as _reader
from lmlab.tokenizer.gguf import read_gguf_tokenizer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.progress import progress_bar

SUPPORTED_ARCHS = ("llama", "qwen2")
# llama.cpp's tensor names -> ours (compress/gguf_export.py writes with the same tables)
BLOCK_NAMES = {
    "attn_q": "attn.q",
    "attn_k": "attn.k",
    "attn_v": "attn.v",
    "attn_output": "attn.o",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
    "attn_norm": "norm1",
    "ffn_norm": "norm2",
}
TOP_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_config(reader: Any, source: str | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmlabError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}",
            file=source,
            field="general.architecture",
        )

    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise LmlabError("required metadata is missing", file=source, field=f"{arch}.{key}")
        return value

    n_head = get("attention.head_count")
    d_model = get("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(vocab),
        n_layer=get("block_count"),
        n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head),
        d_model=d_model,
        d_ff=get("feed_forward_length"),
        head_dim=get("rope.dimension_count", d_model // n_head),
        max_seq_len=get("context_length", 2048),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        qkv_bias="blk.0.attn_q.bias" in names,
        family=arch,
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) back to Hugging Face's half-split order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp block formats that lmlab's quantized layers run as stored (kernels/quant.py): bytes per
# block of 32 weights. Q8_0: fp16 scale, 32 int8. Q4_0: fp16 scale, 16 bytes of nibbles (code - 8).
# Q4_1: fp16 scale, fp16 minimum, 16 bytes of nibbles.
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_LINEAR = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.gate.weight", "mlp.up.weight",
           "mlp.down.weight", "lm_head.weight")  # fmt: skip


def gguf_blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q8_0/Q4_0/Q4_1 tensor's raw rows (rows, bytes) -> (codes, scales, offsets) as QuantLinear holds
    them: int8 codes (rows, K) or the nibble bytes unchanged (rows, K / 2), float32 (rows, K / 32)."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, BLOCK_BYTES[kind])
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        return torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)), scale, None
    if kind == "Q4_0":
        return torch.from_numpy(blocks[..., 2:].reshape(rows, -1).copy()), scale, -8 * scale
    offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return torch.from_numpy(blocks[..., 4:].reshape(rows, -1).copy()), scale, offset


def gguf_state_dict(
    reader: Any, cfg: ModelConfig, dtype: torch.dtype, source: str | None = None, keep_quantized: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors under our names, Q/K rows put back in Hugging Face order: all dequantized, or with
    keep_quantized, linear weights in a block format the kernels run (BLOCK_BYTES) as
    `<layer>.qweight/.scales/.offsets` (a tied head gets its own, from the embedding's blocks)."""
    from gguf.quants import dequantize

    # llama.cpp's converter interleaves Q/K rows for "llama" (its RoPE rotates adjacent pairs); "qwen2" keeps
    # Hugging Face's order (NEOX-style RoPE rotates the two halves)
    interleaved = _field(reader, "general.architecture") == "llama"
    out = {}
    # dequantizing a large file takes a while: show it (a line per interval in a log)
    for t in progress_bar(reader.tensors, desc=f"load {Path(source).name if source else 'GGUF'}", unit="tensor"):
        if t.name in TOP_NAMES:
            ours = TOP_NAMES[t.name]
        else:
            parts = t.name.split(".")  # blk.N.attn_q.weight
            if parts[0] != "blk" or parts[2] not in BLOCK_NAMES:
                continue  # e.g. rope_freqs: recomputed from metadata
            ours = f"layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
        kind = t.tensor_type.name
        head_from_embed = ours == "embed.weight" and cfg.tie_embeddings
        if keep_quantized and kind in BLOCK_BYTES and (ours.endswith(_LINEAR) or head_from_embed):
            layer = "lm_head" if head_from_embed else ours.removesuffix(".weight")
            heads = cfg.n_head if ours.endswith("attn.q.weight") else cfg.n_kv_head
            for part, x in zip(("qweight", "scales", "offsets"), gguf_blocks(t.data, kind)):
                if x is not None:
                    out[f"{layer}.{part}"] = (
                        _unpermute(x, heads) if interleaved and ours.endswith(("attn.q.weight", "attn.k.weight")) else x
                    )
            if not head_from_embed:
                continue  # the embedding itself is also needed as floats, for the lookup
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LmlabError(
                f"tensor {t.name}: quantization {t.tensor_type.name} is not supported", file=source
            ) from None
        w = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        if interleaved and ours.endswith(("attn.q.weight", "attn.q.bias")):
            w = _unpermute(w, cfg.n_head)
        elif interleaved and ours.endswith(("attn.k.weight", "attn.k.bias")):
            w = _unpermute(w, cfg.n_kv_head)
        out[ours] = w.to(dtype)
    return out


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, state dict under our names, tokenizer) of a GGUF file; see gguf_state_dict."""
    path = Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, str(path))
    sd = gguf_state_dict(reader, cfg, dtype, str(path), keep_quantized)
    if "lm_head.qweight" in sd:
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # the head has its own (quantized) weight now
    return cfg, sd, read_gguf_tokenizer(reader)
