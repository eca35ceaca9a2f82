"""Hugging Face checkpoint conversion: config.json fields and weight names <-> ModelConfig and ours.

A family is data here: a config mapping and a table of name rules. GPT-2 stores attention as one
fused `c_attn` in Conv1D layout (in, out); that is the only shape change on the way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "bert")
_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACT["relu"] = "relu"
_ACT_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_ROPE_TYPES = {"default": None, "linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}


def _act(name: str, source: str | None, field: str) -> str:
    if name not in _HF_ACT:
        raise LmlabError(
            f"activation {name!r} is not supported (supported: {', '.join(_HF_ACT)})", file=source, field=field
        )
    return _HF_ACT[name]


def _rope_from_hf(d: dict[str, Any], source: str | None) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise LmlabError(
            f"RoPE scaling {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})",
            file=source,
            field="rope_type",
        )
    if _ROPE_TYPES[kind] is None:
        return theta, None
    scaling = {"type": _ROPE_TYPES[kind], "factor": float(params["factor"])}
    for key in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
        if key in params:
            scaling[key] = params[key]
    return theta, scaling


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    sc = dict(cfg.rope_scaling or {})
    kind = sc.pop("type", None)
    params = {"rope_type": {None: "default"}.get(kind, kind), "rope_theta": cfg.rope_theta, **sc}
    legacy = {"rope_type": kind, **sc} if kind else None
    # v5 reads rope_parameters; v4 reads rope_theta and rope_scaling
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": legacy}


def config_from_hf(d: dict[str, Any], source: str | None = None) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise LmlabError(
            f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            file=source,
            field="model_type",
        )
    try:
        cfg = _FROM_HF[mt](d, source)
    except KeyError as e:
        raise LmlabError("required field is missing", file=source, field=e.args[0]) from None
    head = _task_head_from_hf(d, mt, source)
    return dataclasses.replace(cfg, **head) if head else cfg


_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2", "bert": "Bert"}
_TASK_SUFFIX = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification"}


def _task_head_from_hf(d: dict[str, Any], family: str, source: str | None) -> dict[str, Any]:
    """ModelConfig fields for a *ForSequenceClassification / *ForTokenClassification checkpoint."""
    archs = d.get("architectures") or []
    head = next((h for h, sfx in _TASK_SUFFIX.items() for a in archs if a.endswith(sfx)), None)
    if head is None:
        return {}
    id2label = d.get("id2label") or {}
    n = len(id2label) if id2label else int(d.get("num_labels", 2))
    try:
        labels = [str(id2label.get(str(i), id2label.get(i))) for i in range(n)] if id2label else None
    except AttributeError:
        raise LmlabError("id2label must map ids to names", file=source, field="id2label") from None
    # each transformers class picks its classifier dropout and bias its own way; mirror them
    if family == "bert":
        drop = d.get("classifier_dropout")
        drop = d.get("hidden_dropout_prob", 0.1) if drop is None else drop
        return dict(head=head, num_labels=n, labels=labels, cls_pooling="pooler" if head == "seq_cls" else "last",
                    cls_bias=True, cls_dropout=float(drop), pooler=head == "seq_cls")  # fmt: skip
    if head == "seq_cls":  # score over the last real token, no bias, no dropout
        return dict(head=head, num_labels=n, labels=labels, cls_pooling="last", cls_bias=False, cls_dropout=0.0)
    drop = d.get("classifier_dropout")
    drop = d.get("hidden_dropout", 0.1) if drop is None else drop
    bias = True if family == "gpt2" else bool(d.get("token_classification_bias", True))
    return dict(head=head, num_labels=n, labels=labels, cls_bias=bias, cls_dropout=float(drop))


def _llama_like(d: dict[str, Any], source: str | None) -> ModelConfig:
    mt = d["model_type"]
    theta, scaling = _rope_from_hf(d, source)
    if mt == "qwen2" and d.get("use_sliding_window"):
        raise LmlabError("qwen2 with use_sliding_window is not supported", file=source, field="use_sliding_window")
    n_head = d["num_attention_heads"]
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        d_model=d["hidden_size"],
        d_ff=d["intermediate_size"],
        head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
        max_seq_len=d.get("max_position_embeddings", 2048),
        pos="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        act=_act(d.get("hidden_act", "silu"), source, "hidden_act"),
        mlp_bias=bool(d.get("mlp_bias", False)),
        qkv_bias=True if mt == "qwen2" else bias,
        attn_out_bias=bias,
        sliding_window=d.get("sliding_window") if mt == "mistral" else None,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        attn_dropout=float(d.get("attention_dropout", 0.0)),
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        family=mt,
        extra={"hf": d},
    )


def _gpt2(d: dict[str, Any], source: str | None) -> ModelConfig:
    if (
        not d.get("scale_attn_weights", True)
        or d.get("scale_attn_by_inverse_layer_idx")
        or d.get("reorder_and_upcast_attn")
    ):
        raise LmlabError("GPT-2 attention-scaling variants are not supported", file=source, field="scale_attn_weights")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        d_model=d["n_embd"],
        d_ff=d.get("n_inner") or 4 * d["n_embd"],
        max_seq_len=d.get("n_positions", 1024),
        pos="learned",
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        act=_act(d.get("activation_function", "gelu_new"), source, "activation_function"),
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        embd_dropout=float(d.get("embd_pdrop", 0.0)),
        attn_dropout=float(d.get("attn_pdrop", 0.0)),
        resid_dropout=float(d.get("resid_pdrop", 0.0)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        family="gpt2",
        extra={"hf": d},
    )


def _bert(d: dict[str, Any], source: str | None) -> ModelConfig:
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise LmlabError(
            "only absolute position embeddings are supported", file=source, field="position_embedding_type"
        )
    archs = d.get("architectures") or []
    mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
    hidden_dropout = float(d.get("hidden_dropout_prob", 0.0))
    return ModelConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"],
        d_model=d["hidden_size"],
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 512),
        causal=False,
        pos="learned",
        norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-12),
        norm_position="post",
        embed_norm=True,
        mlp="gelu",
        act=_act(d.get("hidden_act", "gelu"), source, "hidden_act"),
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        type_vocab_size=d.get("type_vocab_size", 2),
        head="mlm" if mlm else "none",
        pooler=not mlm,  # as in transformers: BertForMaskedLM has no pooler, BertModel has one
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        embd_dropout=hidden_dropout,
        resid_dropout=hidden_dropout,
        attn_dropout=float(d.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=d.get("pad_token_id", 0),
        family="bert",
        extra={"hf": d},
    )


_FROM_HF: dict[str, Callable[[dict[str, Any], str | None], ModelConfig]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gpt2": _gpt2,
    "bert": _bert,
}

_ARCH_IGNORED = ("attn_dropout", "embd_dropout", "resid_dropout", "init_std", "extra", "pad_token_id", "bos_token_id")
_ARCH_IGNORED += ("eos_token_id", "family", "labels", "cls_dropout")


def _arch(cfg: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _ARCH_IGNORED}


def config_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    """config.json for `cfg`'s family, or None when transformers has no model with these switches."""
    if cfg.family not in SUPPORTED_MODEL_TYPES or cfg.head_tokens is not None or cfg.eagle:
        return None  # (a reduced draft head and an EAGLE draft have no transformers equivalent)
    base = {k: v for k, v in cfg.extra.get("hf", {}).items() if not k.startswith("_")}
    tokens = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if cfg.family in ("llama", "mistral", "qwen2"):
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
        d = dict(
            architectures=[arch],
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            hidden_act=_ACT_HF[cfg.act],
            tie_word_embeddings=cfg.tie_embeddings,
            attention_dropout=cfg.attn_dropout,
            **_rope_to_hf(cfg),
        )
        if cfg.family == "llama":
            d.update(attention_bias=cfg.attn_out_bias, mlp_bias=cfg.mlp_bias)
        if cfg.family == "mistral":
            d.update(sliding_window=cfg.sliding_window)
        if cfg.family == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
    elif cfg.family == "gpt2":
        d = dict(
            architectures=["GPT2LMHeadModel"],
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=_ACT_HF[cfg.act],
            tie_word_embeddings=cfg.tie_embeddings,
            embd_pdrop=cfg.embd_dropout,
            attn_pdrop=cfg.attn_dropout,
            resid_pdrop=cfg.resid_dropout,
        )
    else:
        d = dict(
            architectures=["BertForMaskedLM" if cfg.head == "mlm" else "BertModel"],
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            intermediate_size=cfg.d_ff,
            hidden_act={"gelu_tanh": "gelu_new"}.get(cfg.act, cfg.act),
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps,
            hidden_dropout_prob=cfg.resid_dropout,
            attention_probs_dropout_prob=cfg.attn_dropout,
            position_embedding_type="absolute",
            tie_word_embeddings=cfg.tie_embeddings,
        )
    if cfg.head in _TASK_SUFFIX:
        base.pop("problem_type", None)
        labels = cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        d.update(
            architectures=[_ARCH_PREFIX[cfg.family] + _TASK_SUFFIX[cfg.head]],
            id2label={str(i): name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
            classifier_dropout=cfg.cls_dropout,
        )
        if cfg.head == "token_cls" and cfg.family in ("llama", "mistral", "qwen2"):
            d["token_classification_bias"] = cfg.cls_bias
    d = {**base, **d, **tokens, "model_type": cfg.family}
    # only claim the family if reading the file back gives the very same architecture
    return d if _arch(config_from_hf(d)) == _arch(cfg) else None


# Weight names: (our regex, their template). Groups carry the layer index; GPT-2's fused
# c_attn maps from three of ours (q, k, v) to one of theirs.
_LLAMA_NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn\.(q|k|v|o)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"layers\.(\d+)\.norm1\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.norm2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"classifier\.(weight|bias)", r"score.\1"),
]
_GPT2_NAMES = [
    (r"embed\.weight", "transformer.wte.weight"),
    (r"pos_embed\.weight", "transformer.wpe.weight"),
    (r"layers\.(\d+)\.norm1\.(weight|bias)", r"transformer.h.\1.ln_1.\2"),
    (r"layers\.(\d+)\.attn\.[qkv]\.(weight|bias)", r"transformer.h.\1.attn.c_attn.\2"),
    (r"layers\.(\d+)\.attn\.o\.(weight|bias)", r"transformer.h.\1.attn.c_proj.\2"),
    (r"layers\.(\d+)\.norm2\.(weight|bias)", r"transformer.h.\1.ln_2.\2"),
    (r"layers\.(\d+)\.mlp\.up\.(weight|bias)", r"transformer.h.\1.mlp.c_fc.\2"),
    (r"layers\.(\d+)\.mlp\.down\.(weight|bias)", r"transformer.h.\1.mlp.c_proj.\2"),
    (r"norm\.(weight|bias)", r"transformer.ln_f.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"classifier\.(weight|bias)", r"score.\1"),  # GPT2ForTokenClassification says classifier (hf_name)
]
_BERT_LAYER = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value"}
_BERT_LAYER.update({"attn.o": "attention.output.dense", "norm1": "attention.output.LayerNorm"})
_BERT_LAYER.update({"mlp.up": "intermediate.dense", "mlp.down": "output.dense", "norm2": "output.LayerNorm"})
_BERT_NAMES = [
    (r"embed\.weight", "bert.embeddings.word_embeddings.weight"),
    (r"pos_embed\.weight", "bert.embeddings.position_embeddings.weight"),
    (r"type_embed\.weight", "bert.embeddings.token_type_embeddings.weight"),
    (r"embed_norm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
    *[
        (rf"layers\.(\d+)\.{re.escape(k)}\.(weight|bias)", rf"bert.encoder.layer.\1.{v}.\2")
        for k, v in _BERT_LAYER.items()
    ],
    (r"pooler\.(weight|bias)", r"bert.pooler.dense.\1"),
    (r"mlm_head\.dense\.(weight|bias)", r"cls.predictions.transform.dense.\1"),
    (r"mlm_head\.norm\.(weight|bias)", r"cls.predictions.transform.LayerNorm.\1"),
    (r"mlm_head\.decoder\.weight", "cls.predictions.decoder.weight"),
    (r"mlm_head\.decoder\.bias", "cls.predictions.bias"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
]
_NAMES = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "gpt2": _GPT2_NAMES,
    "bert": _BERT_NAMES,
}
# prefixes that a base-model checkpoint (GPT2Model, BertModel) leaves out
_OPTIONAL_PREFIX = {"gpt2": "transformer.", "bert": "bert."}


def hf_name(family: str, ours: str, head: str | None = None) -> str:
    """The Hugging Face name of one of our parameters (`head`: the model's head, where names depend on it)."""
    if family == "gpt2" and head == "token_cls" and ours.startswith("classifier."):
        return ours
    for pattern, template in _NAMES[family]:
        if re.fullmatch(pattern, ours):
            return re.sub(pattern, template, ours)
    raise KeyError(ours)


def _is_conv1d(family: str, theirs: str) -> bool:
    return family == "gpt2" and theirs.endswith("weight") and ".h." in theirs


def _split_part(ours: str) -> int | None:
    m = re.search(r"attn\.([qkv])\.", ours)
    return "qkv".index(m.group(1)) if m else None


def state_dict_from_hf(
    cfg: ModelConfig,
    expected: dict[str, torch.Size],
    get: Callable[[str], torch.Tensor | None],
    source: str | None = None,
    optional: set[str] | frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Our state dict, for parameters named and shaped as in `expected`, from a tensor getter by HF name.

    Names in `optional` may be missing (a new task head); they are left out of the result.
    """
    family = cfg.family
    prefix = _OPTIONAL_PREFIX.get(family)
    out: dict[str, torch.Tensor] = {}
    for ours, shape in expected.items():
        theirs = hf_name(family, ours, cfg.head)
        t = get(theirs)
        if t is None and prefix and theirs.startswith(prefix):
            t = get(theirs[len(prefix) :])
        if t is None and theirs == "cls.predictions.bias":
            t = get("cls.predictions.decoder.bias")
        if t is None and ours in optional:
            continue
        if t is None:
            raise LmlabError(f"tensor {theirs!r} is missing (needed for {ours}, shape {tuple(shape)})", file=source)
        if _is_conv1d(family, theirs):
            t = t.t()
        part = _split_part(ours) if family == "gpt2" else None
        if part is not None:  # GPT-2's fused c_attn holds q, k and v one after another
            t = t.chunk(3, dim=0)[part]
        if t.shape != shape:
            raise LmlabError(
                f"tensor {theirs!r} has shape {tuple(t.shape)} but the model expects {tuple(shape)} (for {ours})",
                file=source,
            )
        out[ours] = t.contiguous()
    return out


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors from our state dict (fusing GPT-2's q, k, v back into c_attn)."""
    family = cfg.family
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for ours, t in sd.items():
        theirs = hf_name(family, ours, cfg.head)
        part = _split_part(ours) if family == "gpt2" else None
        if part is not None:
            fused.setdefault(theirs, [None, None, None])[part] = t
            continue
        out[theirs] = t.t() if _is_conv1d(family, theirs) else t
    for theirs, parts in fused.items():
        t = torch.cat(parts, dim=0)
        out[theirs] = t.t() if _is_conv1d(family, theirs) else t
    return {k: v.contiguous() for k, v in out.items()}
