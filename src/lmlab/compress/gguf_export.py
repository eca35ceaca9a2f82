"""Write a GGUF file (llama.cpp, Ollama) from an lmlab model and tokenizer.

What goes in, following llama.cpp's convert_hf_to_gguf.py so that llama.cpp reads it as one of its own:
- architecture "llama" (LLaMA and Mistral configs) or "qwen2" (Q/K/V biases), with their hyperparameters;
- weights under llama.cpp's names (the tables model/gguf.py reads with), Q/K rows of "llama" interleaved
  as its RoPE expects (model/gguf.py undoes exactly this, so export then load is the identity);
- the byte-level BPE tokenizer: tokens, types, merges, pre-tokenizer name, special ids, add_bos, chat template.

Quantization (`quant`): 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them. 2-D matrices become
F32, F16, Q8_0 or Q4_0. With q4_0 the output matrix (the tied token embedding when there is no separate
head) is written Q8_0: llama.cpp's llama-quantize keeps that one matrix at higher precision (it picks Q6_K,
which lmlab does not write), since next-token logits are the most sensitive to rounding.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmlab.compress.ggml_blocks import BLOCK, pack_q4_0, pack_q8_0, quantize_q4_0, quantize_q8_0
from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.model.gguf import BLOCK_NAMES, TOP_NAMES
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.gguf import _SPLITS
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.atomic import atomic_path

QUANTS = ("f32", "f16", "q8_0", "q4_0")
DEFAULT_QUANT = "f16"  # convert_hf_to_gguf.py's default --outtype
# llama.cpp's LlamaFileType ("general.file_type"): what most of the weights are
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}
_OURS_TO_GGUF = {ours: theirs for theirs, ours in BLOCK_NAMES.items()}
_TOP_TO_GGUF = {ours: theirs for theirs, ours in TOP_NAMES.items()}
# the LLaMA block llama.cpp's "llama" and "qwen2" graphs compute: anything else would run as a different model
_REQUIRED = {
    "causal": True,
    "pos": "rope",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "mlp": "swiglu",
    "act": "silu",
    "mlp_bias": False,
    "attn_out_bias": False,
    "embed_norm": False,
    "logn_attn": False,
    "prefix_lm": False,
    "type_vocab_size": 0,
    "head": "lm",
}
# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for a config ("llama" or "qwen2"), or an error naming what does not fit."""
    for name, want in _REQUIRED.items():
        if getattr(cfg, name) != want:
            family = cfg.family or "this model"
            raise LmlabError(
                f"{family} has {name}={getattr(cfg, name)!r}; the GGUF exporter writes LLaMA-style models "
                f"(llama, mistral, qwen2), which need {name}={want!r}",
                field=name,
            )
    scaling = (cfg.rope_scaling or {}).get("type")
    if scaling not in (None, "linear"):
        raise LmlabError(f"RoPE scaling {scaling!r} is not exported (linear or none)", field="rope_scaling")
    if cfg.family == "qwen2":
        if not cfg.qkv_bias:  # llama.cpp's qwen2 graph requires the Q/K/V biases
            raise LmlabError("qwen2 needs qkv_bias=True", field="qkv_bias")
        return "qwen2"
    if cfg.qkv_bias:
        raise LmlabError("Q/K/V biases are exported for qwen2 only", field="qkv_bias")
    return "llama"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split Q/K rows -> llama.cpp's interleaved pairs (inverse of model/gguf.py's)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(ours: str) -> str:
    """llama.cpp's name of one of our parameters: layers.3.attn.q.weight -> blk.3.attn_q.weight."""
    if ours in _TOP_TO_GGUF:
        return _TOP_TO_GGUF[ours]
    stem, kind = ours.rsplit(".", 1)
    parts = stem.split(".", 2)  # layers, N, attn.q
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _OURS_TO_GGUF:
        return f"blk.{parts[1]}.{_OURS_TO_GGUF[parts[2]]}.{kind}"
    raise LmlabError(f"parameter {ours!r} has no GGUF name")


def _tensor_type(name: str, w: torch.Tensor, quant: str, tied: bool) -> str:
    """The storage type of one tensor (see the module docstring)."""
    if w.ndim == 1 or quant in ("f32", "f16"):
        return "f32" if w.ndim == 1 else quant
    if w.shape[-1] % BLOCK:
        raise LmlabError(
            f"tensor {name} has rows of {w.shape[-1]} values, not divisible by {BLOCK} as {quant} needs",
            hint="export with --quant f16 or f32",
        )
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    return "q8_0" if quant == "q4_0" and is_output else quant


def gguf_tensors(
    cfg: ModelConfig, params: dict[str, torch.Tensor], quant: str
) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, data to write, storage type) for each parameter, in the model's order."""
    arch = gguf_arch(cfg)
    for ours, w in params.items():
        if cfg.tie_embeddings and ours == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = _gguf_name(ours)
        w = w.detach().cpu().float()
        if arch == "llama" and ".attn.q." in ours:
            w = _permute(w, cfg.n_head)
        elif arch == "llama" and ".attn.k." in ours:
            w = _permute(w, cfg.n_kv_head)
        kind = _tensor_type(name, w, quant, cfg.tie_embeddings)
        if kind == "q8_0":
            data = pack_q8_0(*quantize_q8_0(w))
        elif kind == "q4_0":
            data = pack_q4_0(*quantize_q4_0(w))
        else:
            data = w.numpy().astype(np.float16 if kind == "f16" else np.float32)
        yield name, data, kind


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this tokenizer splits text before BPE."""
    spec = json.loads(tokenizer.backend.to_str())
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if norm is None and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if norm is None and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # digits one by one, then GPT-2's split
    split = (steps[0].get("pattern") or {}).get("Regex")
    if norm is None and kinds == ["Split", "ByteLevel"] and split == _SPLITS["llama-bpe"]:
        return "llama-bpe"  # Llama 3's split, the name llama.cpp's converter writes for it
    raise LmlabError(
        f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds)) or 'none'}) is not one the GGUF exporter "
        "names for llama.cpp (gpt-2, smollm, llama-bpe); llama.cpp would split text differently",
        field="pre_tokenizer",
    )


def _merges(spec: dict) -> list[str]:
    """BPE merges as "a b" strings (tokenizer.json stores pairs or strings, by version)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _write_tokenizer(writer, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """The byte-level BPE vocabulary and its special tokens and chat template, as llama.cpp reads them."""
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmlabError("only byte-level BPE tokenizers are exported to GGUF (llama.cpp's gpt2 model)")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if n > cfg.vocab_size:
        raise LmlabError(f"the tokenizer has {n} tokens but the model only {cfg.vocab_size} embeddings")
    tokens = [""] * n
    for tok, i in vocab.items():
        if i >= n:
            raise LmlabError(f"token ids are not contiguous: {tok!r} has id {i} of {n}")
        tokens[i] = tok
    types = [_NORMAL] * n
    for added in spec.get("added_tokens", []):
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    # embedding rows past the tokenizer (vocab padded to a round size): named placeholders, as the converter does
    pad = cfg.vocab_size - n
    tokens += [f"[PAD{i}]" for i in range(n, n + pad)]
    types += [_UNUSED] * pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec))
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.token_id(tokenizer.special["unk_token"]),
        "pad": tokenizer.pad_token_id,
    }
    fallback = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
    for key, value in ids.items():
        value = value if value is not None else fallback.get(key)
        if isinstance(value, list):  # several EOS ids in the config: llama.cpp stores one
            value = value[0] if value else None
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    # whether encode() puts BOS/EOS around text, measured rather than read: HF tokenizers say it in a
    # post-processor, GGUF-read ones in their config
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    writer.add_add_bos_token(bool(ids["bos"] is not None and len(full) > len(bare) and full[0] == ids["bos"]))
    writer.add_add_eos_token(bool(ids["eos"] is not None and len(full) > len(bare) and full[-1] == ids["eos"]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    quant: str = DEFAULT_QUANT,
    *,
    name: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` to one GGUF file at `path` (atomically) that llama.cpp and lmlab load."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, RopeScalingType

    if quant not in QUANTS:
        raise LmlabError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}", field="quant")
    if tokenizer is None:
        raise LmlabError("a GGUF file needs the tokenizer, and this checkpoint has none")
    cfg = model.cfg
    arch = gguf_arch(cfg)
    if cfg.eagle:
        raise LmlabError("an EAGLE draft has no GGUF form (its input is the target's hidden states)", field="eagle")
    if cfg.head_tokens is not None:
        raise LmlabError("a draft with a reduced vocabulary head has no GGUF form: llama.cpp's output "
                         "layer scores the whole vocabulary", field="head_tokens")  # fmt: skip
    if cfg.sliding_window is not None:
        # llama.cpp's converter drops it too: outputs agree up to a context of sliding_window tokens
        warnings.warn(
            f"sliding_window={cfg.sliding_window} is not stored: llama.cpp attends to the whole context", stacklevel=2
        )
    params = dict(model.named_parameters())
    # quantize everything before opening the file, so a bad tensor leaves no partial output behind
    tensors = list(gguf_tensors(cfg, params, quant))
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        writer.add_name(name or path.stem)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.n_head != cfg.d_model:  # llama.cpp assumes d_model / n_head otherwise
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        if cfg.rope_scaling is not None:
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(_FILE_TYPES[quant])
        if quant in ("q8_0", "q4_0"):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        _write_tokenizer(writer, tokenizer, cfg)
        for tname, data, kind in tensors:
            raw = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}.get(kind)
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return path
