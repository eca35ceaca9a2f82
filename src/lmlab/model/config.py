"""One configuration for every architecture: a model family is a preset, not a class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError

CHOICES = {
    "pos": ("rope", "learned", "sinusoidal", "alibi", "none"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "mlp": ("swiglu", "gelu"),
    "act": ("silu", "gelu", "gelu_tanh", "relu"),
    "head": ("lm", "mlm", "none", "seq_cls", "token_cls"),
    "cls_pooling": ("last", "pooler", "cls", "mean"),
}
ROPE_SCALINGS = ("linear", "ntk", "dynamic", "llama3")


@dataclass
class ModelConfig:
    """Every switch of the Transformer. Defaults describe a small LLaMA-style decoder."""

    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None: MHA; < n_head: GQA; 1: MQA
    d_model: int = 128
    d_ff: int | None = None  # None: 4 * d_model
    head_dim: int | None = None  # None: d_model // n_head
    max_seq_len: int = 2048  # learned-position table size; original context for RoPE scaling and log-n
    causal: bool = True  # False: a bidirectional encoder (BERT)
    # positions
    pos: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": linear|ntk|dynamic|llama3, "factor": ...}
    # normalization
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    # feed-forward
    mlp: str = "swiglu"
    act: str = "silu"
    mlp_bias: bool = False
    # attention
    qkv_bias: bool = False  # Qwen
    attn_out_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
    logn_attn: bool = False  # Qwen: scale queries by log_{max_seq_len}(pos) past max_seq_len
    prefix_lm: bool = False  # ChatGLM: bidirectional over the prefix, causal after it
    # embeddings and heads
    tie_embeddings: bool = False
    type_vocab_size: int = 0  # > 0: token-type (segment) embeddings, BERT
    head: str = "lm"  # lm: next-token logits; mlm: BERT's transform + decoder; none: hidden states
    pooler: bool = False  # BERT's tanh pooler over the first token
    # task heads (head seq_cls / token_cls): a linear classifier over pooled or per-token states
    num_labels: int = 0
    labels: list[str] | None = None  # label names by id (config.json's id2label)
    cls_pooling: str = "last"  # seq_cls: last real token (decoders), pooler (BERT), cls (first token), mean
    cls_bias: bool = False
    cls_dropout: float = 0.0
    # regularization and init
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02
    # tokens and provenance
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    family: str | None = None  # the Hugging Face model_type this config mirrors, if any
    extra: dict[str, Any] = field(default_factory=dict)  # source-format fields kept for round trips
    # structured pruning: per-layer widths (None: every layer has n_head / n_kv_head / d_ff)
    layer_n_head: list[int] | None = None
    layer_n_kv_head: list[int] | None = None
    layer_d_ff: list[int] | None = None
    # a draft model's reduced vocabulary: the LM head scores only these token ids (every other token's
    # logit is -inf), so a draft for speculative decoding need not pay for a 49k-row head each token
    head_tokens: list[int] | None = None
    # an EAGLE draft (Li et al. 2024): each position's input is fc([target's final hidden state; token
    # embedding]) instead of the embedding alone, and its output predicts the target's next hidden state
    eagle: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LmlabError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}", field="d_model")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LmlabError(f"{getattr(self, name)!r} is not one of {', '.join(allowed)}", field=name)
        if self.n_head % self.n_kv_head:
            raise LmlabError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}", field="n_kv_head")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_SCALINGS:
                raise LmlabError(f"{kind!r} is not one of {', '.join(ROPE_SCALINGS)}", field="rope_scaling.type")
        if self.head in ("seq_cls", "token_cls"):
            if self.num_labels <= 0:
                raise LmlabError(f"head {self.head!r} needs num_labels > 0", field="num_labels")
            if self.labels is not None and len(self.labels) != self.num_labels:
                raise LmlabError(f"{len(self.labels)} label names for num_labels={self.num_labels}", field="labels")
            if self.head == "seq_cls" and self.cls_pooling == "pooler" and not self.pooler:
                raise LmlabError("cls_pooling 'pooler' needs pooler: true", field="cls_pooling")
        if self.prefix_lm and not self.causal:
            raise LmlabError("prefix_lm needs a causal model", field="prefix_lm")
        for name in ("layer_n_head", "layer_n_kv_head", "layer_d_ff"):
            widths = getattr(self, name)
            if widths is not None and (len(widths) != self.n_layer or min(widths) < 1):
                raise LmlabError(f"needs {self.n_layer} entries (one per layer), each >= 1", field=name)
        if self.head_tokens is not None:
            ids = self.head_tokens
            if self.head != "lm" or self.tie_embeddings:
                raise LmlabError("a reduced head needs head 'lm' and untied embeddings", field="head_tokens")
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.vocab_size:
                raise LmlabError(f"needs distinct token ids in 0..{self.vocab_size - 1}", field="head_tokens")
        if self.eagle and (self.head != "lm" or not self.causal):
            raise LmlabError("an EAGLE draft needs head 'lm' and a causal model", field="eagle")
        for i in range(self.n_layer):
            h, kv = self.heads(i)
            if h % kv:
                raise LmlabError(f"layer {i}: {h} heads is not a multiple of {kv} KV heads", field="layer_n_head")

    def heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of one layer: per-layer after structured pruning, else uniform."""
        h = self.layer_n_head[layer] if self.layer_n_head is not None else self.n_head
        kv = self.layer_n_kv_head[layer] if self.layer_n_kv_head is not None else self.n_kv_head
        return h, kv

    def ff(self, layer: int) -> int:
        """The MLP width of one layer."""
        return self.layer_d_ff[layer] if self.layer_d_ff is not None else self.d_ff

    @property
    def is_encoder(self) -> bool:
        """True for a bidirectional encoder such as BERT."""
        return not self.causal

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None) -> ModelConfig:
        """Build from a dict, naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise LmlabError(
                    f"unknown model config field (known: {', '.join(sorted(known))})", file=source, field=key
                )
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with some fields changed."""
        if name not in PRESETS:
            raise LmlabError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", act="silu", family="llama")
_GPT2 = dict(
    pos="learned",
    norm="layernorm",
    mlp="gelu",
    act="gelu_tanh",
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    norm_eps=1e-5,
    family="gpt2",
)
_BERT = dict(
    causal=False,
    pos="learned",
    norm="layernorm",
    norm_position="post",
    embed_norm=True,
    mlp="gelu",
    act="gelu",
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    norm_eps=1e-12,
    type_vocab_size=2,
    head="mlm",
    pooler=False,
    tie_embeddings=True,
    max_seq_len=512,
    pad_token_id=0,
    family="bert",
)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny random models for tests and experiments
    "llama-tiny": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=176),
    "qwen2-tiny": dict(
        _LLAMA,
        family="qwen2",
        qkv_bias=True,
        vocab_size=512,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=176,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=True,
    ),
    "mistral-tiny": dict(
        _LLAMA,
        family="mistral",
        vocab_size=512,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=176,
        sliding_window=8,
    ),
    "gpt2-tiny": dict(_GPT2, vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=256),
    "bert-tiny": dict(_BERT, vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=256),
    # seed innovations on a tiny LLaMA trunk
    "baichuan-tiny": dict(_LLAMA, family=None, pos="alibi", vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=176),
    "chatglm-tiny": dict(
        _LLAMA, family=None, prefix_lm=True, vocab_size=512, n_layer=2, n_head=4, n_kv_head=1, d_model=64
    ),
    "qwen-logn-tiny": dict(
        _LLAMA,
        family=None,
        qkv_bias=True,
        logn_attn=True,
        max_seq_len=32,
        vocab_size=512,
        n_layer=2,
        n_head=4,
        d_model=64,
    ),
    # real sizes
    "llama-10m": dict(
        _LLAMA, vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=288, d_ff=768, max_seq_len=512
    ),
    "llama-17m": dict(_LLAMA, vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024, max_seq_len=1024),
    "llama-30m": dict(
        _LLAMA, vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1408, max_seq_len=1024
    ),
    "smollm2-135m": dict(
        _LLAMA,
        vocab_size=49152,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        d_model=576,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=1e5,
        tie_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
    "qwen2-0.5b": dict(
        _LLAMA,
        family="qwen2",
        qkv_bias=True,
        vocab_size=151936,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        d_model=896,
        d_ff=4864,
        max_seq_len=32768,
        rope_theta=1e6,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008, max_seq_len=4096),
    "mistral-7b": dict(
        _LLAMA,
        family="mistral",
        vocab_size=32000,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        d_ff=14336,
        max_seq_len=32768,
        sliding_window=4096,
    ),
    "gpt2-small": dict(_GPT2, vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "bert-mini": dict(_BERT, vocab_size=30522, n_layer=4, n_head=4, d_model=256, d_ff=1024),
    "bert-base": dict(_BERT, vocab_size=30522, n_layer=12, n_head=12, d_model=768, d_ff=3072),
}
