"""The Transformer: one decoder/encoder whose architecture is entirely in its ModelConfig.

GPT-2, LLaMA, Mistral, Qwen2 and BERT differ only in switches: how positions enter (learned,
sinusoidal, RoPE, ALiBi), which norm and where (pre/post), which MLP, attention biases and masks,
and which head sits on top.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.model.alibi import alibi_bias, alibi_slopes
from lmlab.model.attention import Attention, KVCache
from lmlab.model.config import ModelConfig
from lmlab.model.cross_entropy import linear_cross_entropy
from lmlab.model.mask import build_mask
from lmlab.model.mlp import ACTIVATIONS, MLP
from lmlab.model.norm import make_norm
from lmlab.model.rope import RotaryEmbedding
from lmlab.utils.device import policy


class Block(nn.Module):
    """Attention then MLP, each with a residual; the norm goes before (pre-norm) or after (post-norm)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg, layer)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, **attn_args) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), **attn_args))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, **attn_args)))
        return self.norm2(x + self.drop(self.mlp(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense, activation, norm, then a (tied) projection to the vocabulary."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS[cfg.act]
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """Everything before the projection to the vocabulary."""
        return self.norm(self.act(self.dense(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need" (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class Transformer(nn.Module):
    """A decoder (causal) or encoder (bidirectional) Transformer with an optional LM/MLM head and pooler."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d) if cfg.pos == "learned" else None
        self.type_embed = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.embd_dropout)
        self.rope = RotaryEmbedding(cfg) if cfg.pos == "rope" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        head_size = len(cfg.head_tokens) if cfg.head_tokens is not None else cfg.vocab_size
        self.lm_head = nn.Linear(d, head_size, bias=False) if cfg.head == "lm" else None
        self.mlm_head = MLMHead(cfg) if cfg.head == "mlm" else None
        self.pooler = nn.Linear(d, d) if cfg.pooler else None
        self.fc = nn.Linear(2 * d, d) if cfg.eagle else None  # an EAGLE draft: [feature; embedding] -> d
        task = cfg.head in ("seq_cls", "token_cls")
        self.classifier = nn.Linear(d, cfg.num_labels, bias=cfg.cls_bias) if task else None
        self.cls_drop = nn.Dropout(cfg.cls_dropout)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        self.tie_weights()
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the derived, unsaved tables: after building on the meta device, for instance."""
        cfg = self.cfg
        if cfg.pos == "sinusoidal":
            self.register_buffer(
                "sin_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model).to(device), persistent=False
            )
        if cfg.pos == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head).to(device), persistent=False)
        if self.rope is not None:
            self.rope.reset(device)
        if cfg.head_tokens is not None:
            self.register_buffer("head_ids", torch.tensor(cfg.head_tokens, device=device), persistent=False)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection when the config says so."""
        if self.cfg.tie_embeddings:
            head = self.lm_head if self.lm_head is not None else getattr(self.mlm_head, "decoder", None)
            if head is not None:
                head.weight = self.embed.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, d_model).

        attention_mask (B, past_len + T): 1 for real tokens, 0 for padding (left or right).
        position_ids default to the count of real tokens before each one, so left padding is harmless.
        prefix_len (B,): for prefix-LM models, how many leading tokens see each other both ways.
        kv_cache: holds the keys and values of the first kv_cache.length tokens; this call appends its own.
        With a static cache (generate.kv_cache.StaticKVCache), attention_mask covers all its slots.
        document_ids (B, past_len + T): packed training rows; attention stays inside each document
        (pass position_ids that restart at 0 for each document too).
        branch_ids (B, past_len + T): a trunk (0) shared by branches (1, 2, ...) packed after it, each branch
        seeing the trunk and itself (a prompt and its replies in one row; pass position_ids that restart at
        the trunk's end for each branch).
        features (B, T, d_model): an EAGLE draft's other input, the target's final hidden state at the
        position before each token (compress/eagle.py).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        device = input_ids.device
        q_idx = None  # key-sequence index of each query; None: the last T of the S keys
        if getattr(kv_cache, "static", False):
            # a static cache: keys span its whole buffer, this call's tokens sit at kv_cache.slots,
            # and the mask hides unwritten slots; nothing here depends on a changing Python number
            if attention_mask is None and tree_mask is None:
                raise ValueError("a static KV cache needs attention_mask over all of its max_len slots")
            S, q_idx = kv_cache.max_len, kv_cache.slots
        else:
            S = (kv_cache.length if kv_cache is not None else 0) + T  # keys: the cached ones, then these
            if attention_mask is not None and bool(attention_mask.all()):
                attention_mask = None  # no padding: lets SDPA use its causal fast path
        max_pos = None  # known without a device sync when positions are derived here
        if tree_mask is not None:
            if position_ids is None:
                raise ValueError("a tree_mask needs position_ids (each candidate's depth in the sequence)")
            max_pos = S - 1  # a bound: a candidate sits no later in the sequence than in the keys
        if position_ids is None:
            max_pos = S - 1
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = position_ids[:, S - T :] if q_idx is None else position_ids.index_select(1, q_idx)
            else:
                position_ids = torch.arange(S - T, S, device=device).expand(B, T)

        x = self.embed(input_ids)
        if self.fc is not None:
            if features is None:
                raise LmlabError("this is an EAGLE draft: it reads a target's hidden states (features=...)",
                                 field="eagle", hint="use it as a draft: lmlab generate --model TARGET --draft PATH")  # fmt: skip
            x = self.fc(torch.cat([features.to(x.dtype), x], -1))  # (B, T, 2d) -> (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        elif cfg.pos == "sinusoidal":
            x = x + self.sin_table[position_ids].to(x.dtype)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)

        window_matters = cfg.sliding_window is not None and cfg.sliding_window < S
        plain = attention_mask is None and prefix_len is None and document_ids is None and branch_ids is None
        plain = plain and not window_matters and cfg.pos != "alibi" and tree_mask is None
        # SDPA's causal fast path needs no mask tensor; a single decode step with no padding sees every key
        is_causal = cfg.causal and plain and T == S and T > 1
        mask = None
        if tree_mask is not None:
            mask = tree_mask
        elif not is_causal and not (plain and T == 1):
            mask = build_mask(cfg, T, S, attention_mask, prefix_len, device, document_ids, q_idx, branch_ids)
        if cfg.pos == "alibi":
            queries = torch.arange(S - T, S, device=device) if q_idx is None else q_idx
            bias = alibi_bias(self.alibi_slopes, queries, torch.arange(S, device=device))
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            mask = mask.to(x.dtype)
        q_scale = None
        if cfg.logn_attn:
            # Qwen: past the training length, sharpen attention by log_L(n) so entropy stays put
            n = (position_ids + 1).float()
            q_scale = (torch.log(n) / math.log(cfg.max_seq_len)).clamp(min=1.0)[:, None, :, None].to(x.dtype)
        rope = self.rope(position_ids, x.dtype, max_pos) if self.rope is not None else None
        for block in self.layers:
            x = block(x, rope=rope, mask=mask, is_causal=is_causal, q_scale=q_scale, kv_cache=kv_cache)
        return self.norm(x) if self.norm is not None else x

    def forward(
        self,
        input_ids: torch.Tensor,
        logits_to_keep: int = 0,
        logits_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        **kwargs,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) from the LM or MLM head, (B, num_labels) from a sequence classifier,
        (B, T, num_labels) from a token classifier; hidden states when the model has no head.

        logits_to_keep > 0 computes the head for the last positions only (generation needs one).
        logits_mask (B, T) bool computes it only where True, returning (N, vocab) in row-major order:
        fine-tuning needs logits on the answer tokens alone, and the vocabulary projection is costly.
        targets (B, T): return instead the cross-entropy of the LM/MLM head's prediction at each
        position against targets[:, t] (already shifted for a decoder; -100: no loss), averaged over
        the counted tokens (reduction "mean") or added up ("sum"), computed without materializing the
        logits (see cross_entropy.py).
        """
        h = self.hidden_states(input_ids, **kwargs)
        if targets is not None:
            return self.head_loss(h, targets, label_smoothing, reduction)
        if logits_mask is not None:
            h = h[logits_mask]
        if self.classifier is not None:
            if self.cfg.head == "seq_cls":
                h = self.pool_sequence(h, input_ids, kwargs.get("attention_mask"))
            return self.classifier(self.cls_drop(h))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if self.lm_head is not None:
            return self.full_vocab(self.lm_head(h))
        if self.mlm_head is not None:
            return self.mlm_head(h)
        return h

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """A reduced head's logits (..., len(head_tokens)) placed in the whole vocabulary (..., vocab),
        -inf elsewhere: sampling, argmax and speculative decoding then work unchanged."""
        if self.cfg.head_tokens is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return out.index_copy(-1, self.head_ids, logits)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(h[:, 0]))."""
        if self.pooler is None:
            raise ValueError("this model has no pooler")
        return torch.tanh(self.pooler(h[:, 0]))

    def pool_sequence(
        self, h: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One vector per sequence (B, d) for classification, as cfg.cls_pooling says."""
        kind = self.cfg.cls_pooling
        if kind == "pooler":
            return self.pool(h)
        if kind == "cls":
            return h[:, 0]
        real = attention_mask.bool() if attention_mask is not None else None
        if real is None and self.cfg.pad_token_id is not None:
            real = input_ids != self.cfg.pad_token_id  # what transformers does without a mask
        if kind == "mean":
            if real is None:
                return h.mean(1)
            w = real[..., None].to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp(min=1)
        if real is None:
            return h[:, -1]
        # the rightmost real token: works for left and right padding alike
        last = (torch.arange(h.shape[1], device=h.device) * real).argmax(-1)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def head_loss(
        self, h: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy of the LM/MLM head on hidden states h (B, T, d) against targets (B, T)."""
        if self.lm_head is None and self.mlm_head is None:
            raise ValueError("targets need a model with an LM or MLM head")
        # a data-dependent shape: kept out of compiled graphs, and off a GPU's causal LM steps (a host sync)
        drop = self.mlm_head is not None or policy(h.device).drop_ignored_rows
        if drop and not torch.compiler.is_compiling():
            keep = targets != -100
            if not bool(keep.all()):
                h, targets = h[keep], targets[keep]  # BERT predicts 15% of tokens: project only those
        head = self.lm_head
        if self.mlm_head is not None:
            h, head = self.mlm_head.transform(h), self.mlm_head.decoder
        # the chunked loss needs the plain layer (a LoRA head adds its own path); under torch.compile
        # it runs eagerly after the compiled trunk
        if type(head) is nn.Linear and self.cfg.head_tokens is None:
            return linear_cross_entropy(
                h, head.weight, targets, head.bias, label_smoothing=label_smoothing, reduction=reduction
            )
        logits = self.full_vocab(head(h))  # (no change unless a reduced LM head)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """Cross-entropy of next-token (causal) or masked-token (encoder) predictions; -100 is ignored."""
        if self.cfg.causal:
            labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
        return self(input_ids, targets=labels, **kwargs)
