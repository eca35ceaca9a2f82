"""Prefix caching: keys/values of recent prompts, so a prompt that starts the way an earlier one did
(the same system prompt, a chat that grows by a turn) prefills only the tokens that differ.

A prompt's K/V at position t depend only on tokens 0..t, so the cached K/V of a shared prefix are
exactly what a fresh prefill would compute for it; only the rest is run, with the prefix as the
past. Entries are whole prompts, least recently used first out, bounded by their total tokens
(for SmolLM2 a token's K/V take 46 KB). vLLM and SGLang do the same with block- and radix-tree
indexes over a paged cache; this scans a handful of entries, which costs microseconds here.

The engine adds each prompt after its prefill and each finished sequence (its prompt and answer), so
a chat's next request, the conversation and a new turn, prefills only the new turn. An entry that
begins another one serves no lookup the other does not, so the longer one replaces it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from lmlab.generate.kv_cache import common_prefix  # (the engine and tests import it from here too)


class PrefixCache:
    """Recent prompts' K/V (n_layer, H_kv, P, head_dim), at most `max_tokens` tokens in all, and, where
    given, their final hidden states (P, d_model), which an EAGLE draft reads (serve --draft)."""

    def __init__(self, max_tokens: int, min_match: int = 16) -> None:
        self.max_tokens, self.min_match = max_tokens, min_match
        # prompt -> (k, v, states or None)
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self.tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(n, k, v, states or None) for the longest cached prefix of `prompt` of at least `min_match`
        tokens, at most all but its last token (whose logits the prefill must produce); None if none."""
        best, key = 0, None
        for k in self.entries:
            n = common_prefix(k, prompt)
            if n > best:
                best, key = n, k
        n = min(best, len(prompt) - 1)
        if key is None or n < self.min_match:
            return None
        self.entries.move_to_end(key)
        k, v, h = self.entries[key]
        return n, k[:, :, :n], v[:, :, :n], h[:n] if h is not None else None

    def add(
        self, prompt: list[int], k: torch.Tensor, v: torch.Tensor, states: torch.Tensor | None = None, copy: bool = True
    ) -> None:
        """Keep a prefilled prompt's K/V (and hidden states, if given; copied unless `copy` is False: the
        caller's own copies), dropping the least recently used beyond the budget."""
        key = tuple(prompt)
        if len(key) < self.min_match or len(key) > self.max_tokens:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        for old in [e for e in self.entries if len(e) < len(key) and key[: len(e)] == e]:
            if states is not None or self.entries[old][2] is None:  # (keep the states an EAGLE draft reads)
                del self.entries[old]
                self.tokens -= len(old)
        if copy:
            k, v, states = k.clone(), v.clone(), states.clone() if states is not None else None
        self.entries[key] = (k, v, states)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)
