"""Preallocated KV caches: keys and values of past tokens, so each decode step costs one token's forward.

`KVCache` grows a Python-int `length` and hands attention exactly the filled part. `StaticKVCache`
writes at slots given as a tensor and hands attention the whole buffer (unfilled slots masked out),
so every decode step has the same shapes and no Python number changes: one `torch.compile` graph
serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.model.transformer import Transformer


class KVCache:
    """Fixed-size key/value buffers (n_layer, B, H_kv, max_len, head_dim), filled left to right.

    Nothing is reallocated while decoding; `length` can also be set back (speculative decoding
    rolls back rejected draft tokens that way), and `reorder` follows beams in beam search.
    """

    def __init__(
        self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layer, self.max_len, self.length = n_layer, max_len, 0

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> KVCache:
        """A cache shaped for `model`, holding up to `max_len` tokens per row."""
        cfg = model.cfg
        p = next(model.parameters())
        # a structurally pruned model may keep fewer KV heads in some layers: size for the widest
        n_kv = max(cfg.heads(i)[1] for i in range(cfg.n_layer))
        return cls(cfg.n_layer, batch, n_kv, max_len, cfg.head_dim, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, H_kv, T, hd) for `layer`; return all cached ones."""
        start, end, h = self.length, self.length + k.shape[2], k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :h, start:end] = k
        self.v[layer, :, :h, start:end] = v
        if layer == self.n_layer - 1:
            self.length = end
        return self.k[layer, :, :h, :end], self.v[layer, :, :h, :end]

    def move(self, src: list[int], dst: int) -> None:
        """Copy the entries at columns `src` to columns dst, dst + 1, ... (a speculative round's
        accepted candidates of a tree, next to each other after the sequence)."""
        move_columns([self.k, self.v], src, dst, dim=3)  # (n_layer, B, H_kv, max_len, hd)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search: each surviving beam takes its parent's past)."""
        self.k[:, :, :, : self.length] = self.k[:, index, :, : self.length]
        self.v[:, :, :, : self.length] = self.v[:, index, :, : self.length]

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return self.k.numel() * self.k.element_size() * 2


class StaticKVCache:
    """Fixed-shape key/value buffers, one pair per layer (B, H_kv, max_len, head_dim).

    Before each forward call the caller sets `slots` (T,), the buffer columns this call's tokens
    occupy; the model attends over all `max_len` columns and relies on the attention mask to hide
    the ones not yet written. `length` is bookkeeping for the caller; the model never reads it here,
    because a Python number that changes every step would make a compiled graph recompile.
    """

    static = True

    def __init__(
        self, n_layer: int, batch: int, n_kv_head: int | list[int], max_len: int, head_dim: int, dtype: torch.dtype,
        device,
    ) -> None:  # fmt: skip
        # n_kv_head: one count, or one per layer (a structurally pruned model)
        heads = n_kv_head if isinstance(n_kv_head, list) else [n_kv_head] * n_layer
        shapes = [(batch, h, max_len, head_dim) for h in heads]
        # one tensor per layer: an in-place write to a graph input compiles to an in-place write,
        # where a write through a view of one big buffer would copy the layer's whole cache
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.n_layer, self.max_len, self.length = n_layer, max_len, 0
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        self.in_use = False  # a kept cache (CUDA graphs) serves one decode at a time

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> StaticKVCache:
        """A cache shaped for `model`, holding up to `max_len` tokens per row."""
        cfg = model.cfg
        p = next(model.parameters())
        heads = [cfg.heads(i)[1] for i in range(cfg.n_layer)]
        return cls(cfg.n_layer, batch, heads, max_len, cfg.head_dim, p.dtype, p.device)

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor], length: int) -> StaticKVCache:
        """A cache over existing per-layer buffers (B, H_kv, max_len, hd) (a serving batch's first B
        rows), whose next call writes one token at column `length`."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.n_layer, cache.max_len = k, v, len(k), k[0].shape[2]
        cache.length, cache.in_use = length, False
        cache.slots = torch.tensor([length], device=k[0].device)
        return cache

    def advance(self, n: int) -> None:
        """The next call writes `n` tokens after those already cached."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache is full: {self.length + n} tokens > max_len {self.max_len}")
        self.slots = torch.arange(self.length, self.length + n, device=self.slots.device)
        self.length += n

    def move(self, src: list[int], dst: int) -> None:
        """Copy the entries at columns `src` to columns dst, dst + 1, ... (as `KVCache.move`)."""
        move_columns(self.k + self.v, src, dst)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys/values (B, H_kv, T, hd) at `slots`; return the whole buffers."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def move_columns(buffers: list[torch.Tensor], src: list[int], dst: int, dim: int = 2) -> None:
    """In each buffer (per layer: rows, H_kv, columns, hd; columns at `dim`), copy columns `src` to dst,
    dst + 1, ... (a tree round's accepted candidates, next to the sequence)."""
    if src == list(range(dst, dst + len(src))):
        return
    s = torch.tensor(src, device=buffers[0].device)
    d = torch.arange(dst, dst + len(src), device=buffers[0].device)
    for t in buffers:
        t.index_copy_(dim, d, t.index_select(dim, s))


class PromptCache:
    """The keys and values of one token sequence, kept between generate calls (a chat's conversation
    so far), so that a prompt beginning with it runs only its new tokens, as llama.cpp's server does
    with `cache_prompt` and transformers' `generate` with `past_key_values` passed back in.

    A token's keys/values depend only on the tokens up to it, so the kept ones are what a fresh
    prefill would compute for a shared prefix (to float rounding: a decode step's matmuls add in
    another order than a prefill's). They are valid for the model that computed them with the
    weights it had then (`owner`, set by the caller, says which model).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.cache: KVCache | StaticKVCache | None = None
        self.owner = None
        # a speculative draft's state when the last speculative answer ended (speculative.KeptDraft):
        # its own keys/values and an EAGLE draft's pending target states, checked against the next prompt
        self.draft = None

    def reusable(self, prompt: list[int], owner) -> int:
        """How many of `prompt`'s first tokens have kept keys/values: the common prefix, at most all
        but the last token (its logits start the answer), 0 for another model."""
        if owner != self.owner or self.cache is None:
            return 0
        return min(common_prefix(self.ids, prompt), len(prompt) - 1)

    def fill(self, cache: KVCache | StaticKVCache, n: int) -> None:
        """Copy the first `n` kept tokens' keys/values into the fresh `cache` (one row), whose next call
        writes after them."""
        copy_prefix(self.cache, cache, n)

    def keep(self, cache: KVCache | StaticKVCache, ids: list[int], owner, shared: bool = False) -> None:
        """Keep `cache`'s first len(ids) tokens (those of `ids`). A `shared` cache (a kept CUDA-graph
        cache that the next decode writes over) is copied; any other is held as it is."""
        if shared:
            n = len(ids)
            copy = StaticKVCache.__new__(StaticKVCache)
            copy.k = [t[:, :, :n].clone() for t in cache.k]
            copy.v = [t[:, :, :n].clone() for t in cache.v]
            cache = copy
        self.cache, self.ids, self.owner = cache, list(ids), owner


def copy_prefix(src: KVCache | StaticKVCache | None, dst: KVCache | StaticKVCache, n: int) -> None:
    """Copy the first `n` columns of keys/values from `src` into the fresh one-row `dst`, whose next call
    writes after them."""
    if n:
        for (sk, sv), (dk, dv) in zip(_layers(src), _layers(dst)):
            h = min(sk.shape[1], dk.shape[1])  # a pruned model's layers may have fewer KV heads
            dk[:, :h, :n] = sk[:, :h, :n]
            dv[:, :h, :n] = sv[:, :h, :n]
    dst.length = n


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _layers(cache: KVCache | StaticKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) buffers (B, H_kv, columns, head_dim), for either kind of cache."""
    if isinstance(cache.k, list):
        return list(zip(cache.k, cache.v))
    return [(cache.k[i], cache.v[i]) for i in range(cache.k.shape[0])]
