"""GGUF files (llama.cpp, Ollama): dequantize to a Transformer, rebuild the tokenizer from metadata."""

from __future__ import annotations

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


def gguf_state_dict(
    reader: Any, cfg: ModelConfig, dtype: torch.dtype, source: str | None = None
) -> dict[str, torch.Tensor]:
    """Dequantized tensors under our names, Q/K rows put back in Hugging Face order."""
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


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, state dict under our names, tokenizer) of a GGUF file."""
    path = Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, str(path))
    return cfg, gguf_state_dict(reader, cfg, dtype, str(path)), read_gguf_tokenizer(reader)
