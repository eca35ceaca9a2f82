"""Logits processors and token selection: what temperature, top-k, top-p, min-p and the penalties do.

Each processor takes the ids so far (B, S) and next-token scores (B, V) and returns new scores.
They follow transformers' definitions exactly (same order, same edge cases), so a seed and a
config mean the same thing here and there. Penalties act on every sequence; the warpers
(temperature, top-k, top-p, min-p) only matter when sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def repetition_penalty(penalty: float, pad_lengths: torch.Tensor | None = None) -> Processor:
    """CTRL's penalty: seen tokens' positive scores are divided by `penalty`, negative ones multiplied.

    Left padding (the first pad_lengths[b] positions of row b) does not count as seen.
    """

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        if pad_lengths is not None:  # send padding to a dummy column V, dropped at the end
            pos = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(pos[None, :] < pad_lengths[:, None], V)
        scores = torch.cat((scores, scores.new_zeros(B, 1)), dim=1)
        seen = torch.gather(scores, 1, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter(1, ids, seen)[:, :V]

    return apply


def presence_frequency_penalty(presence: float, frequency: float, prompt_len: int) -> Processor:
    """OpenAI's penalties over generated tokens: minus `presence` once if seen, minus `frequency` per time seen."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = ids[:, prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)

    return apply


def no_repeat_ngram(n: int) -> Processor:
    """Forbid any token that would complete an n-gram already present in the sequence."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] + 1 < n:
            return scores
        scores = scores.clone()
        for row, seq in enumerate(ids.tolist()):
            prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = NEG_INF
        return scores

    return apply


def temperature(t: float) -> Processor:
    """Divide scores by t: t < 1 sharpens the distribution, t > 1 flattens it."""
    return lambda ids, scores: scores / t


def top_k(k: int, min_keep: int = 1) -> Processor:
    """Keep the k highest-scoring tokens."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(max(k, min_keep), scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)

    return apply


def top_p(p: float, min_keep: int = 1) -> Processor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p)  # the unlikely tail whose mass stays within 1 - p
        remove[..., -min_keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)

    return apply


def min_p(p: float, min_keep: int = 1) -> Processor:
    """Keep tokens whose probability is at least p times the most likely token's."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < p * probs.amax(dim=-1, keepdim=True)
        top = torch.argsort(scores, dim=-1, descending=True)[..., :min_keep]
        remove.scatter_(1, top, False)
        return scores.masked_fill(remove, NEG_INF)

    return apply


def build_processors(
    config, prompt_len: int, sampling: bool, attention_mask: torch.Tensor | None = None
) -> list[Processor]:
    """The processors a GenerationConfig asks for, in transformers' order."""
    procs: list[Processor] = []
    if config.repetition_penalty != 1.0:
        pad_lengths = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
        procs.append(repetition_penalty(config.repetition_penalty, pad_lengths))
    if config.no_repeat_ngram_size > 0:
        procs.append(no_repeat_ngram(config.no_repeat_ngram_size))
    if config.presence_penalty or config.frequency_penalty:
        procs.append(presence_frequency_penalty(config.presence_penalty, config.frequency_penalty, prompt_len))
    if sampling:
        if config.temperature != 1.0:
            procs.append(temperature(config.temperature))
        if config.top_k > 0:
            procs.append(top_k(config.top_k))
        if config.top_p < 1.0:
            procs.append(top_p(config.top_p))
        if config.min_p > 0:
            procs.append(min_p(config.min_p))
    return procs


def apply_processors(procs: list[Processor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run processors in order."""
    for proc in procs:
        scores = proc(ids, scores)
    return scores
