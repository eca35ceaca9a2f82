"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each proposed token x is accepted with probability min(1, p(x) / q(x)) (p: target, q: draft);
at the first rejection a token is drawn from the residual max(0, p - q), renormalized; if all k
pass, one more comes free from p. The output follows the target's distribution exactly
(Leviathan et al. 2023; Chen et al. 2023), and with greedy decoding it is the target's greedy
output token for token; only the speed depends on how often the draft agrees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate import cpu_kernels
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import Generation, _as_token_rows, _finish, stop_token_ids
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import apply_processors, build_processors
from lmlab.generate.stream import StopStrings, text_pieces
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer

# the default `confidence` (transformers' default too): with SmolLM2 and its distilled draft on a CPU,
# 0.4 gave 1.22x plain greedy where 0 gave 1.10x (docs/compress.md)
DRAFT_CONFIDENCE = 0.4


@dataclass
class SpeculativeStats:
    """How well the draft guessed."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target accepted."""
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_round(self) -> float:
        """Tokens produced per target forward (1.0 means no gain)."""
        return self.generated / max(self.rounds, 1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to sample from after a rejection: max(0, p - q), renormalized."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x) / q(x)) for the drafted token x."""
    return float(torch.clamp(p[token] / q[token], max=1.0)) if q[token] > 0 else 1.0


def truncated_draft(model: Transformer, n_layers: int) -> Transformer:
    """A draft that is the target's first n layers (with its embeddings, final norm and head), sharing weights."""
    if not 1 <= n_layers < model.cfg.n_layer:
        raise LmlabError(f"a draft of {n_layers} layers: the target has {model.cfg.n_layer}, so 1 to "
                         f"{model.cfg.n_layer - 1}", field="draft")  # fmt: skip
    cfg = dataclasses.replace(model.cfg, n_layer=n_layers)
    with torch.device("meta"):
        draft = Transformer(cfg)
    for name, child in model.named_children():
        setattr(draft, name, nn.ModuleList(list(child)[:n_layers]) if name == "layers" else child)
    draft.init_buffers(next(model.parameters()).device)
    return draft.eval()


def check_draft(target: Transformer, draft: Transformer) -> None:
    """A draft must share the target's vocabulary (and an EAGLE draft its hidden width)."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise LmlabError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) is not the target's "
                         f"({target.cfg.vocab_size})", field="draft", hint="use a draft with the same tokenizer")  # fmt: skip
    if draft.cfg.eagle and draft.cfg.d_model != target.cfg.d_model:
        raise LmlabError(f"the EAGLE draft reads hidden states of width {draft.cfg.d_model}, the target's are "
                         f"{target.cfg.d_model}", field="draft", hint="train the draft on this target")  # fmt: skip


def speculative_generate(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer | None,
    prompt: str | list[int],
    config: GenerationConfig | None = None,
    num_draft_tokens: int = 4,
    confidence: float = DRAFT_CONFIDENCE,
) -> tuple[Generation, SpeculativeStats]:
    """Generate for one prompt with a draft model; returns the generation and acceptance statistics.

    A round drafts up to num_draft_tokens tokens, fewer when the draft's probability for the token it
    just proposed falls below `confidence` (transformers' assistant_confidence_threshold): a guess the
    draft itself doubts is likely rejected, and each drafted token costs a draft step and a row of the
    target's check. The output is the same for any setting; only the speed changes."""
    config = config or GenerationConfig()
    stats = SpeculativeStats()
    prompt_ids = _as_token_rows(tokenizer, prompt)[0]
    generated = [t for new in speculative_rounds(target, draft, tokenizer, prompt_ids, config, num_draft_tokens,
                                                 confidence, stats) for t in new]  # fmt: skip
    eos = stop_token_ids(target, tokenizer, config)
    return _finish(tokenizer, generated, eos, len(prompt_ids), StopStrings(config.stop)), stats


def speculative_stream(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    config: GenerationConfig | None = None,
    num_draft_tokens: int = 4,
    confidence: float = DRAFT_CONFIDENCE,
    stats: SpeculativeStats | None = None,
) -> Iterator[str]:
    """`speculative_generate` as `decode.stream` shows text: pieces as each round's accepted tokens
    complete characters, stop strings never shown. `stats`, if given, fills in as rounds go."""
    config = config or GenerationConfig()
    if config.num_beams > 1 or config.num_return_sequences > 1:
        raise LmlabError("speculative decoding takes one sequence: num_beams and num_return_sequences must be 1")
    prompt_ids = _as_token_rows(tokenizer, prompt)[0]
    rounds = speculative_rounds(target, draft, tokenizer, prompt_ids, config, num_draft_tokens, confidence,
                                stats if stats is not None else SpeculativeStats())  # fmt: skip
    try:
        yield from text_pieces((t for new in rounds for t in new), tokenizer, stop_token_ids(target, tokenizer, config),
                               config.stop)  # fmt: skip
    finally:
        rounds.close()  # an EOS or a stop string ends the text: the loop goes now, not when collected


@torch.inference_mode()
def speculative_rounds(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer | None,
    prompt_ids: list[int],
    config: GenerationConfig,
    num_draft_tokens: int,
    confidence: float,
    stats: SpeculativeStats,
) -> Iterator[list[int]]:
    """The speculative loop: yields each round's new tokens (the accepted draft tokens and the target's
    own), up to an EOS (included) or max_new_tokens, and counts them into `stats`."""
    check_draft(target, draft)
    eagle = draft.cfg.eagle  # a draft that reads the target's hidden states (compress/eagle.py)
    eos = stop_token_ids(target, tokenizer, config)
    device = next(target.parameters()).device
    max_len = len(prompt_ids) + config.max_new_tokens + num_draft_tokens + 1
    t_cache, d_cache = KVCache.for_model(target, 1, max_len), KVCache.for_model(draft, 1, max_len)
    generator = None
    if config.sampling and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seq = list(prompt_ids)
    procs = build_processors(config, len(prompt_ids), config.sampling)

    def scores(logits: torch.Tensor, prefix: list[int]) -> torch.Tensor:
        """The next-token scores after the logits processors."""
        return apply_processors(procs, torch.tensor([prefix], device=device), logits.float()[None])[0]

    def dist(scores: torch.Tensor) -> torch.Tensor:
        """The next-token distribution (one-hot at the argmax when greedy)."""
        if not config.sampling:
            return torch.nn.functional.one_hot(scores.argmax(), scores.shape[-1]).float()
        return scores.softmax(-1)

    def pick(probs: torch.Tensor) -> int:
        if not config.sampling:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=generator))

    def hidden(model: Transformer, cache: KVCache, tokens: list[int], features=None) -> torch.Tensor:
        ids = torch.tensor([tokens], device=device)
        # the target's check feeds k + 1 tokens at once: the decode kernels' matmuls pay off
        with cpu_kernels.for_rows(len(tokens), device):
            return model.hidden_states(ids, kv_cache=cache, features=features)[0]  # (len(tokens), d)

    def head(model: Transformer, h: torch.Tensor, full: bool = True) -> torch.Tensor:
        with cpu_kernels.for_rows(h.shape[0], device):
            logits = model.lm_head(h)  # (rows, V), or over a reduced head's tokens
        return model.full_vocab(logits) if full else logits

    # plain greedy (no sampling, no processors): tokens are argmaxes, so no distributions are built
    # over the whole vocabulary; the same tokens as the general rule with one-hot distributions
    plain = not config.sampling and not procs
    head_ids = draft.cfg.head_tokens

    def verify(drafted: list[int], q: list[torch.Tensor], t_logits: torch.Tensor) -> list[int]:
        """The general rule: each drafted token x kept with probability min(1, p(x) / q(x)); the first
        rejected one replaced by a sample of max(0, p - q); all kept: one more token from the target."""
        accepted: list[int] = []
        for i, token in enumerate(drafted):
            p = dist(scores(t_logits[i], seq + accepted))
            u = float(torch.rand((), generator=generator, device=device)) if config.sampling else 0.0
            if u >= acceptance_probability(p, q[i], token):
                accepted.append(pick(residual(p, q[i])))  # rejected: the target's correction ends the round
                return accepted
            accepted.append(token)
            stats.accepted += 1
        accepted.append(pick(dist(scores(t_logits[len(drafted)], seq + accepted))))  # all kept: one comes free
        return accepted

    # an EAGLE draft's position i reads (the target's state after seq[i], seq[i + 1]). The target's cache
    # stays one token behind seq; `pending` holds its states at the positions the draft's cache still
    # lacks (from d_cache.length to len(seq) - 2), the only ones the draft will read
    pending = torch.empty(0, target.cfg.d_model, device=device)
    if eagle and len(seq) > 1:
        pending = hidden(target, t_cache, seq[:-1])

    while len(seq) - len(prompt_ids) < config.max_new_tokens:
        k = min(num_draft_tokens, config.max_new_tokens - (len(seq) - len(prompt_ids)))
        known = len(seq) - 1  # positions whose target state is known (an EAGLE draft's certain ones)
        # the draft proposes k tokens, one forward each (its cache catches up on accepted tokens first)
        drafted: list[int] = []
        q: list[torch.Tensor] = []
        if eagle:
            if len(pending):  # (a one-token prompt leaves nothing to read in the first round)
                h = hidden(draft, d_cache, seq[d_cache.length + 1 :], pending[None])[-1:]
            else:
                k = 0
        else:
            h = hidden(draft, d_cache, seq[d_cache.length :])[-1:]
        for i in range(k):
            if plain:
                z = head(draft, h, full=False)[0].float()
                j = int(z.argmax())
                drafted.append(head_ids[j] if head_ids is not None else j)
                sure = float(torch.softmax(z, -1)[j]) if confidence > 0 else 1.0  # (a reduced head's others: p = 0)
            else:
                s = scores(head(draft, h)[0], seq + drafted)
                q.append(dist(s))
                drafted.append(pick(q[-1]))
                # the draft's probability of its own proposal (greedy: under its softmax)
                sure = float((q[-1] if config.sampling else s.softmax(-1))[drafted[-1]]) if confidence > 0 else 1.0
            if sure < confidence:
                break
            if i < k - 1:  # an EAGLE draft reads its own predicted state where the target's is not known
                h = hidden(draft, d_cache, drafted[-1:], h[None] if eagle else None)
        k = len(drafted)
        # the target scores all of them in one forward
        t_hidden = hidden(target, t_cache, seq[t_cache.length :] + drafted)[-(k + 1) :]
        t_logits = head(target, t_hidden)
        if plain:  # each drafted token stands while it is the target's argmax; the first miss is replaced
            best = t_logits.argmax(-1).tolist()
            n = next((i for i, t in enumerate(drafted) if t != best[i]), k)
            accepted = [*drafted[:n], best[n]]
            stats.accepted += n
        else:
            accepted = verify(drafted, q, t_logits)
        stats.rounds += 1
        stats.proposed += k
        stop_at = next((i + 1 for i, t in enumerate(accepted) if t in eos), None)
        new = accepted[:stop_at][: config.max_new_tokens - (len(seq) - len(prompt_ids))]
        seq += new
        stats.generated += len(new)
        # roll both caches back to what is now certain (everything but the newest token); an EAGLE
        # draft's drafted positions read its own predicted states, so they go even when accepted
        t_cache.length = min(t_cache.length, len(seq) - 1)
        d_cache.length = min(d_cache.length, known if eagle else len(seq) - 1)
        if eagle:  # the checked positions from `known` on, up to the newest token's
            pending = t_hidden[: len(seq) - 1 - known]
        yield new
        if stop_at is not None:
            break
