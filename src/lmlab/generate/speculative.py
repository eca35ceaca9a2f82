"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each proposed token x is accepted with probability min(1, p(x) / q(x)) (p: target, q: draft);
at the first rejection a token is drawn from the residual max(0, p - q), renormalized; if all k
pass, one more comes free from p. The output follows the target's distribution exactly
(Leviathan et al. 2023; Chen et al. 2023), and with greedy decoding it is the target's greedy
output token for token; only the speed depends on how often the draft agrees.

A round can also check a tree of the draft's guesses (draft_tree.py): greedy rounds walk down the
children that match the target's argmax; sampled rounds draw each node's children from the draft
without replacement and try them in turn, each rejection turning p into the residual and taking the
rejected token out of q (recursive rejection sampling), which again leaves the target's distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate import cpu_kernels, decode
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import Generation, _as_token_rows, _finish, stop_token_ids
from lmlab.generate.draft_tree import DEFAULT_TREE, DraftTree, DynamicTree, ancestor_rows, attention_rows, parse_tree
from lmlab.generate.kv_cache import KVCache, PromptCache, StaticKVCache, common_prefix, copy_prefix
from lmlab.generate.sampling import apply_processors, build_processors
from lmlab.generate.stream import StopStrings, text_pieces
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.device import policy

# the most tokens a round runs through the target again only to get an EAGLE draft its states, when it
# fell behind (a server's batched steps): beyond that, the draft starts over on the last this many tokens
RECOMPUTE_WINDOW = 32

# the default `confidence` (transformers' default too): with SmolLM2 and its distilled draft on a CPU,
# 0.4 gave 1.22x plain greedy where 0 gave 1.10x (docs/compress.md)
DRAFT_CONFIDENCE = 0.4


@dataclass
class KeptDraft:
    """A Speculation's draft state when its rounds ended, kept in a PromptCache (`draft`) so that the
    next answer of a conversation starts from it rather than over on the last RECOMPUTE_WINDOW tokens."""

    ids: list[int]  # the sequence it was computed on
    cache: KVCache | StaticKVCache  # the draft's keys/values: sequence positions base .. base + length
    base: int
    pending: torch.Tensor  # an EAGLE draft's target states from position base + length on
    owner: tuple  # (target, draft) prompt_cache_owner: the model objects and their fingerprints

    @property
    def length(self) -> int:
        """How many positions its keys/values hold (the cache is its own: nothing writes it after)."""
        return self.cache.length

    @property
    def start(self) -> int:
        """The first sequence position whose target state it lacks."""
        return self.base + self.length + len(self.pending)


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


def load_draft(spec: str, target: Transformer, device=None) -> Transformer:
    """A draft from a command line's --draft: a checkpoint path (quantized blocks kept where lmlab's
    kernels run them), or ":N" for the target's first N layers."""
    from lmlab.model.checkpoint import load_pretrained

    if spec.startswith(":"):
        if not spec[1:].isdigit():
            raise LmlabError(f"{spec!r}: want a checkpoint or :N (the target's first N layers)", field="--draft")
        return truncated_draft(target, int(spec[1:]))
    draft = load_pretrained(spec, device=device, dequantize="auto")[0]
    check_draft(target, draft)
    return draft


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
    past: PromptCache | None = None,
    tree: DraftTree | DynamicTree | str | None = "auto",
) -> tuple[Generation, SpeculativeStats]:
    """Generate for one prompt with a draft model; returns the generation and acceptance statistics.

    A round drafts up to num_draft_tokens tokens, fewer when the draft's probability for the token it
    just proposed falls below `confidence` (transformers' assistant_confidence_threshold): a guess the
    draft itself doubts is likely rejected, and each drafted token costs a draft step and a row of the
    target's check. The output is the same for any setting; only the speed changes. `past`: the
    target's keys/values kept by an earlier call (`speculative_rounds`). `tree`: each round checks
    a tree of the draft's guesses instead of a chain (draft_tree.py; a static tree, or for greedy
    decoding without logits processors a dynamic one; num_draft_tokens and confidence then do not apply); "auto"
    (`default_tree`): where a check of its candidates costs about what a chain's does; None: always a
    chain."""
    config = config or GenerationConfig()
    stats = SpeculativeStats()
    prompt_ids = _as_token_rows(tokenizer, prompt)[0]
    generated = [t for new in speculative_rounds(target, draft, tokenizer, prompt_ids, config, num_draft_tokens,
                                                 confidence, stats, past, tree) for t in new]  # fmt: skip
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
    past: PromptCache | None = None,
    tree: DraftTree | DynamicTree | str | None = "auto",
) -> Iterator[str]:
    """`speculative_generate` as `decode.stream` shows text: pieces as each round's accepted tokens
    complete characters, stop strings never shown. `stats`, if given, fills in as rounds go; `past`
    as in `decode.stream` (the target's keys/values); `tree` as in `speculative_generate`."""
    config = config or GenerationConfig()
    if config.num_beams > 1 or config.num_return_sequences > 1:
        raise LmlabError("speculative decoding takes one sequence: num_beams and num_return_sequences must be 1")
    prompt_ids = _as_token_rows(tokenizer, prompt)[0]
    rounds = speculative_rounds(target, draft, tokenizer, prompt_ids, config, num_draft_tokens, confidence,
                                stats if stats is not None else SpeculativeStats(), past, tree)  # fmt: skip
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
    past: PromptCache | None = None,
    tree: DraftTree | DynamicTree | str | None = "auto",
) -> Iterator[list[int]]:
    """The speculative loop: yields each round's new tokens (the accepted draft tokens and the target's
    own), up to an EOS (included) or max_new_tokens, and counts them into `stats`.

    `past`: the target's keys/values kept from an earlier call (`decode.decode_steps`); the prompt's
    part that begins with them is not run again, and `past` keeps this call's when the rounds end, with
    the draft's state (`KeptDraft`), which the next call starts from where the prompt begins with what
    it read. (Without one, e.g. after plain answers only, an EAGLE draft reads the target's states of
    the last RECOMPUTE_WINDOW kept tokens, run again.)"""
    device = next(target.parameters()).device
    procs = build_processors(config, len(prompt_ids), config.sampling)
    tree = resolve_tree(tree, target, draft, not config.sampling and not procs)
    max_len = _max_len(len(prompt_ids), config, round_room(num_draft_tokens, tree))
    generator = None
    if config.sampling and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    spec = Speculation(target, draft, config, procs, generator, stop_token_ids(target, tokenizer, config), max_len,
                       num_draft_tokens, confidence, stats, tree=tree)  # fmt: skip
    t_cache = spec.target_cache(max_len)
    if past is not None:
        owner = spec.owners[0]
        past.fill(t_cache, past.reusable(prompt_ids, owner))
        spec.adopt(past.draft, prompt_ids, t_cache.length)
    seq = list(prompt_ids)
    whole = True  # between rounds the cache holds seq[:-1] (a round cut short by an exception: unknown)
    try:
        while len(seq) - len(prompt_ids) < config.max_new_tokens:
            whole = False
            new = spec.round(seq, t_cache, config.max_new_tokens - (len(seq) - len(prompt_ids)))
            seq += new
            whole = True
            yield new
            if new[-1] in spec.eos:
                break
    finally:
        if past is not None and whole:  # (else `past` keeps what it had: fill copied it)
            past.keep(t_cache, seq[: t_cache.length], owner)
            past.draft = spec.kept(seq)


def _max_len(prompt_len: int, config: GenerationConfig, num_draft_tokens: int) -> int:
    # the most cache columns a sequence needs: a round's check writes num_draft_tokens + 1 (or a
    # tree's candidates and the newest token) from the position before max_new_tokens' last
    return prompt_len + config.max_new_tokens + num_draft_tokens + 1


def round_room(num_draft_tokens: int, tree: DraftTree | DynamicTree | None) -> int:
    """How many columns past the newest token a round may write to a cache (the num_draft_tokens of a
    sequence's most columns): a chain's drafts, or one less than a tree's most entries a round writes."""
    return max(num_draft_tokens, tree.entries - 1 if tree else 0)


def default_tree(target: Transformer) -> DraftTree | None:
    """The candidate tree rounds check by default: `DEFAULT_TREE` where the device policy says
    a check's extra rows cost next to nothing (a GPU), else None: a chain. (On a CPU a tree's 7-row
    check costs about a chain's 5-row one with float32 weights, one pass of the kernels' 8 rows, but
    its rounds measured no faster over all than the chain's, whose confidence cut drafts less; with
    quantized blocks each row of a check costs a fair part of a step, and rounds lose either way.)"""
    return DraftTree.parse(DEFAULT_TREE) if policy(next(target.parameters()).device).draft_tree else None


def resolve_tree(
    tree: DraftTree | DynamicTree | str | None, target: Transformer, draft: Transformer, plain: bool
) -> DraftTree | DynamicTree | None:
    """The tree rounds check: `tree` ("auto": `default_tree`), for plain greedy decoding, or a static
    tree for sampling and for greedy decoding after logits processors (a dynamic tree picks candidates
    by the draft's raw probabilities: sampled, that would bias the draws the acceptance rule assumes), and
    models whose attention follows positions and a mask alone: ALiBi's distances between cache slots, a
    sliding window (built from slots) and dynamic NTK RoPE (its base follows a call's largest position)
    would not follow a tree."""
    tree = default_tree(target) if tree == "auto" else parse_tree(tree) if tree else None
    for m in (target, draft):
        dynamic = getattr(m.rope, "dynamic", False) if getattr(m, "rope", None) is not None else False
        if m.cfg.pos == "alibi" or m.cfg.sliding_window is not None or dynamic:
            return None
    return tree if plain or isinstance(tree, DraftTree) else None


def _widths(num_draft_tokens: int, tree: DraftTree | DynamicTree | None) -> tuple[int, int]:
    # (the widest chain call: a chain's check, the draft's catch-up; the most columns a round writes)
    width = max(num_draft_tokens, tree.depth if tree else 0) + 1
    return width, max(width, tree.entries if tree else 0)


def _capacity(max_len: int, width: int) -> int:
    # a compiled round's static caches: room for a check padded to `width` past the sequence's end
    return decode.capacity_for(max_len + width)


def precompile(
    target: Transformer,
    draft: Transformer,
    prompt_len: int,
    config: GenerationConfig,
    num_draft_tokens: int,
    tree: DraftTree | DynamicTree | str | None = "auto",
) -> list[decode._Warmup]:
    """Start the background compiles of the graphs that compiled rounds over a `prompt_len`-token
    prompt run (the target's check, the draft's step and catch-up: `Speculation._run`, over
    `target_cache`'s and the draft cache's width; a tree's check and the draft's calls per depth), as
    `decode.precompile` does for plain steps: a chat compiles them while its user types. Only with
    compile "auto"."""
    if config.compile != "auto":
        return []
    plain = not config.sampling and not build_processors(config, prompt_len, config.sampling)
    tree = resolve_tree(tree, target, draft, plain)
    width, span = _widths(num_draft_tokens, tree)
    capacity = _capacity(_max_len(prompt_len, config, round_room(num_draft_tokens, tree)), span)
    graphs = [(target, width, False), (draft, 1, False), (draft, width, False)]
    if tree is not None:
        graphs += [(target, len(tree) + 1, True), *((draft, n, True) for n in tree.draft_widths)]
    device = next(target.parameters()).device
    return [decode.warmup(m, 1, capacity, device, width=w, tree=t) for m, w, t in graphs]


class Speculation:
    """One sequence's speculative decoding between rounds: the draft's KV cache, the target's hidden
    states an EAGLE draft has yet to read, and the sequence's sampling state (processors, generator).

    The target's KV cache stays the caller's (`round` takes it), so a server can keep a sequence in its
    shared batch cache and speculate only while the sequence decodes alone (serve/engine.py).

    With `compile` (True: wait for the graphs; "auto": eager calls until their background compile is
    done; default: the config's), a round's forwards run as torch.compile graphs over static caches, as
    `generate`'s compiled decode steps do: the target's check always as num_draft_tokens + 1 rows, the
    draft's steps as one row, its catch-up as num_draft_tokens + 1 (shorter calls padded with tokens that
    nobody attends to; their keys/values land past the sequence and are overwritten later). A round's
    eager forwards cost more in per-op overhead than a small model's arithmetic, so against compiled
    plain steps eager rounds lose; compiled ones need not. The target's cache must then be a
    StaticKVCache (`target_cache`); any other keeps the target's forwards eager.
    """

    def __init__(
        self,
        target: Transformer,
        draft: Transformer,
        config: GenerationConfig,
        procs: list,
        generator: torch.Generator | None,
        eos: set[int] | frozenset[int],
        max_len: int,
        num_draft_tokens: int,
        confidence: float = DRAFT_CONFIDENCE,
        stats: SpeculativeStats | None = None,
        compile: bool | str | None = None,
        tree: DraftTree | DynamicTree | str | None = None,
    ) -> None:
        check_draft(target, draft)
        self.target, self.draft, self.config, self.procs, self.generator = target, draft, config, procs, generator
        self.eos, self.num_draft_tokens, self.confidence = eos, num_draft_tokens, confidence
        self.stats = stats if stats is not None else SpeculativeStats()
        self.device = next(target.parameters()).device
        self.eagle = draft.cfg.eagle  # a draft that reads the target's hidden states (compress/eagle.py)
        self.compile = config.compile if compile is None else compile
        # plain greedy (no sampling, no processors): tokens are argmaxes, so no distributions are built
        # over the whole vocabulary; the same tokens as the general rule with one-hot distributions
        self.plain = not config.sampling and not procs
        self.tree = resolve_tree(tree, target, draft, self.plain)  # candidates per round, or None
        # the widest call a steady round makes: the target's check (a tree's: its own graph), the draft's
        # catch-up on the last round's accepted tokens; and the most columns a round writes
        self.width, self.span = _widths(num_draft_tokens, self.tree)
        self._warm: dict[tuple, decode._Warmup] = {}  # (draft?, width, capacity) -> its graph's compile
        self.replays = policy(self.device).decode_compile_mode == "reduce-overhead"
        if self.compile:
            self.d_cache = self._static(draft, _capacity(max_len, self.span))
        else:
            self.d_cache = KVCache.for_model(draft, 1, max_len)
        self.base = 0  # the sequence position of the draft cache's first entry (> 0 once it started over)
        # an EAGLE draft's position i reads (the target's state after seq[i], seq[i + 1]). `pending`
        # holds the target's states from position base + d_cache.length on, the only ones the draft will
        # read; `round` computes any it lacks (the first round, or a server's batched steps in between)
        p = next(target.parameters())
        self.pending = torch.empty(0, target.cfg.d_model, device=self.device, dtype=p.dtype)
        # the last round's extra work before drafting (a caller's timing aid): tokens the draft read, and
        # tokens the target ran again for their states; and whether a call of it ran eagerly while its
        # graph compiles (its time is not what a round costs once they are built)
        self.caught_up = self.recomputed = 0
        self.compiling = False

    def adopt(self, kept: KeptDraft | None, prompt: list[int], reused: int) -> bool:
        """Start from `kept` (an earlier answer's state, the same two models'), cut back to what `prompt`
        shares with the sequence it was computed on and to the `reused` tokens whose keys/values the
        target's cache already holds (a regenerated answer, an edited turn). False (nothing changed)
        where nothing of it is left."""
        if kept is None or kept.owner != self.owners:
            return False
        shared, base = common_prefix(kept.ids, prompt), kept.base
        # cache entry p read tokens base..p (an EAGLE draft's also p + 1); a pending state at q, tokens <= q;
        # and neither may reach past the target's kept keys/values (a round reruns the target from there)
        length = max(0, min(kept.length, shared - base - (1 if self.eagle else 0), reused - base))
        whole = length == kept.length  # (else the states after the cut are lost with the cache entries)
        pending = kept.pending[: max(0, min(shared, reused) - base - length) if whole else 0]
        if self.eagle and not len(pending) and length and base + length == len(prompt) - 1:
            # its first proposal needs the last entry's output, which was not kept: one entry fewer, and
            # the round reruns the target on one token for that entry's state (else it could not draft)
            length -= 1
        if length + len(pending) == 0:
            return False
        copy_prefix(kept.cache, self.d_cache, length)
        self.base, self.pending = kept.base, pending
        return True

    def kept(self, seq: list[int]) -> KeptDraft:
        """The draft's state after the rounds over `seq`, to keep. Its cache is held as it is: each
        Speculation makes its own (a decode step's static cache, shared between calls, is what
        PromptCache.keep copies)."""
        return KeptDraft(list(seq), self.d_cache, self.base, self.pending, self.owners)

    @functools.cached_property
    def owners(self) -> tuple:
        """(target, draft) `decode.prompt_cache_owner`s: which models' kept state this can use (computed
        once: a fingerprint walks the model, ~2 ms for SmolLM2)."""
        return decode.prompt_cache_owner(self.target), decode.prompt_cache_owner(self.draft)

    def add_states(self, states: torch.Tensor) -> None:
        """The target's hidden states (n, d) at the positions after those already pending (a caller
        that computed them anyway, e.g. a server's prefill, saves `round` computing them again)."""
        self.pending = torch.cat([self.pending, states.to(self.pending.dtype)])

    def _scores(self, logits: torch.Tensor, prefix: list[int]) -> torch.Tensor:
        """The next-token scores after the logits processors."""
        return apply_processors(self.procs, torch.tensor([prefix], device=self.device), logits.float()[None])[0]

    def _dist(self, scores: torch.Tensor) -> torch.Tensor:
        """The next-token distribution (one-hot at the argmax when greedy)."""
        if not self.config.sampling:
            return torch.nn.functional.one_hot(scores.argmax(), scores.shape[-1]).float()
        return scores.softmax(-1)

    def _pick(self, probs: torch.Tensor) -> int:
        if not self.config.sampling:
            return int(probs.argmax())
        g = self.generator
        return int(torch.multinomial(probs.to(g.device) if g is not None else probs, 1, generator=g))

    def _uniform(self) -> float:
        g = self.generator
        return float(torch.rand((), generator=g, device=g.device if g is not None else self.device))

    def target_cache(self, max_len: int) -> KVCache | StaticKVCache:
        """A one-row cache for the target's keys/values of up to `max_len` tokens: static (room for a
        padded check past the end) where the rounds compile."""
        if self.compile:
            return self._static(self.target, _capacity(max_len, self.span))
        return KVCache.for_model(self.target, 1, max_len)

    def _static(self, model: Transformer, capacity: int) -> StaticKVCache:
        cache = StaticKVCache.for_model(model, 1, capacity)
        if self.replays:  # a CUDA graph replays over the buffers it recorded: these stay where they are
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        return cache

    def _run(
        self, model: Transformer, cache, tokens: list[int], features=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`tokens` fed after the cache's contents: their final hidden states (T, d), and where a
        compiled graph ran, its head logits (T, V') too (else None: `_head` computes the rows wanted)."""
        T = len(tokens)
        if not getattr(cache, "static", False):
            ids = torch.tensor([tokens], device=self.device)
            # the target's check feeds k + 1 tokens at once: the decode kernels' matmuls pay off
            with cpu_kernels.for_rows(T, self.device):
                return model.hidden_states(ids, kv_cache=cache, features=features)[0], None  # (T, d)
        # a static cache: a compiled graph of width W >= T where one is ready, padded; else eager, unpadded
        W = next((w for w in ((1, self.width) if model is self.draft else (self.width,)) if w >= T), 0)
        graph = self._graph(model, W, cache.max_len) if W else None
        W = W if graph is not None else T
        start = cache.length
        cache.advance(W)
        cache.length = start + T  # the pad's columns are left out of the mask, and overwritten later
        mask = (torch.arange(cache.max_len, device=self.device) < start + T).long()[None]  # (1, C)
        ids = torch.tensor([tokens + tokens[-1:] * (W - T)], device=self.device)
        if features is not None and W > T:
            features = torch.cat([features, features.new_zeros(1, W - T, features.shape[-1])], 1)
        if graph is not None:
            h, z = graph(ids, attention_mask=mask, kv_cache=cache, **decode.rows_features(model, W, features))
            if self.replays:  # a replayed CUDA graph's outputs are overwritten by the next replay
                h, z = h.clone(), z.clone()
            return h[0, :T], z[0, :T]
        with cpu_kernels.for_rows(T, self.device):
            return model.hidden_states(ids, attention_mask=mask, kv_cache=cache, features=features)[0], None

    def _graph(self, model: Transformer, width: int, capacity: int, tree: bool = False):
        """The compiled rows graph of `model` for `width` tokens over `capacity` columns (`tree`: the
        one called with a tree mask), if ready."""
        if not self.compile:
            return None
        slot = (model is self.draft, width, capacity, tree)
        warm = self._warm.get(slot)
        if warm is None:  # (looked up once per sequence: the key's fingerprint of the model takes ~2 ms)
            warm = self._warm[slot] = decode.warmup(model, 1, capacity, self.device, width=width, tree=tree)
            if self.compile != "auto":
                warm.ready.wait()
        if not warm.ready.is_set():
            self.compiling = True
            return None
        return warm.forward if warm.failed is None else None

    def _head(
        self, model: Transformer, h: torch.Tensor, z: torch.Tensor | None = None, full: bool = True
    ) -> torch.Tensor:
        """Head logits (rows, V) of final states `h` (or those a graph computed, `z`); full=False keeps a
        reduced head's (rows, len(head_tokens))."""
        if z is None:
            with cpu_kernels.for_rows(h.shape[0], self.device):
                z = model.lm_head(h)  # (rows, V), or over a reduced head's tokens
        return model.full_vocab(z) if full else z

    def _verify(self, seq: list[int], drafted: list[int], q: list[torch.Tensor], t_logits: torch.Tensor) -> list[int]:
        """The general rule: each drafted token x kept with probability min(1, p(x) / q(x)); the first
        rejected one replaced by a sample of max(0, p - q); all kept: one more token from the target."""
        accepted: list[int] = []
        for i, token in enumerate(drafted):
            p = self._dist(self._scores(t_logits[i], seq + accepted))
            u = self._uniform() if self.config.sampling else 0.0
            if u >= acceptance_probability(p, q[i], token):
                accepted.append(self._pick(residual(p, q[i])))  # rejected: the target's correction ends the round
                return accepted
            accepted.append(token)
            self.stats.accepted += 1
        accepted.append(self._pick(self._dist(self._scores(t_logits[len(drafted)], seq + accepted))))  # one free
        return accepted

    def _run_tree(
        self, model: Transformer, cache, tokens: list[int], positions: list[int], prefix: int, region: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """`tokens` at `positions` fed after the cache's contents, seeing the cache's first `prefix`
        columns and, of the columns from there to the last of theirs, those `region` (T, R) marks (a
        candidate tree's mask): their final hidden states (T, d) and, from a compiled graph, head logits."""
        T = len(tokens)
        static = getattr(cache, "static", False)
        graph = self._graph(model, T, cache.max_len, tree=True) if static else None
        columns = cache.max_len if static else cache.length + T
        mask = attention_rows(prefix, region, columns, T).to(self.device)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        if static:
            cache.advance(T)
        if graph is not None:
            h, z = graph(
                ids, tree_mask=mask, position_ids=pos, kv_cache=cache, **decode.rows_features(model, T, features)
            )
            if self.replays:
                h, z = h.clone(), z.clone()
            return h[0], z[0]
        with cpu_kernels.for_rows(T, self.device):
            h = model.hidden_states(ids, position_ids=pos, tree_mask=mask, kv_cache=cache, features=features)
        return h[0], None

    def _guesses(self, h: torch.Tensor, z: torch.Tensor | None, n: int) -> list[int]:
        """The draft's n likeliest next tokens, best first, after final state h (1, d)."""
        z = self._head(self.draft, h, z, full=False)[0]
        top = z.topk(n).indices.tolist()
        head_ids = self.draft.cfg.head_tokens
        return [head_ids[j] for j in top] if head_ids is not None else top

    def _draft_static(
        self, tree: DraftTree, h: torch.Tensor, z, start: int, seq: list[int]
    ) -> tuple[list[int], dict[int, torch.Tensor], set[int]]:
        """A static tree's candidate tokens: the draft's guesses level by level, one draft call per depth
        over that depth's candidates that have children, written from draft cache entry `start`.
        Greedy: a node's children are its top guesses (after the logits processors, if any). Sampling: they are drawn from the draft's
        distribution at the node without replacement (one after another, each from what the earlier
        ones left), and the node's distribution is kept for the acceptance rule (node -> q; -1: the
        root); a child the distribution has no tokens left for (top-k, top-p) is dead, and so are its
        children: they fill their rows and are never accepted."""
        draft, d_cache, eagle, paths = self.draft, self.d_cache, self.eagle, tree.paths
        tokens: list[int] = [0] * len(paths)
        dists: dict[int, torch.Tensor] = {}
        dead: set[int] = set()

        def branch(node: int, h: torch.Tensor, z) -> None:
            want = tree.wanted(node)
            if self.plain:
                drawn = self._guesses(h, z, want)
            else:  # the processors read the node's own prefix: the sequence, then its path
                prefix = seq + [tokens[a] for a in tree.ancestors(node)] if node >= 0 else seq
                scores = self._scores(self._head(draft, h, z)[0], prefix)
                if not self.config.sampling:  # greedy after logits processors: the best processed scores
                    drawn = scores.topk(want).indices.tolist()
                else:
                    dists[node] = self._dist(scores)
                    drawn = self._draw(dists[node], want) if node not in dead else []
            for c in tree.children[node]:
                rank = paths[c][-1]
                tokens[c] = drawn[rank] if rank < len(drawn) else tokens[c - 1] if c else 0
                if rank >= len(drawn):
                    dead.add(c)

        branch(-1, h, z)
        states = {-1: h}  # an expanded candidate's draft state (1, d): its children's EAGLE input
        for level, region in zip(tree.levels, tree.level_rows):
            feats = torch.cat([states[tree.parents[i]] for i in level])[None] if eagle else None
            hs, zs = self._run_tree(draft, d_cache, [tokens[i] for i in level],
                                    [start + len(paths[i]) - 1 for i in level], start, region, feats)  # fmt: skip
            for j, i in enumerate(level):
                states[i] = hs[j : j + 1]
                branch(i, hs[j : j + 1], zs[j : j + 1] if zs is not None else None)
        return tokens, dists, dead

    def _draw(self, q: torch.Tensor, n: int) -> list[int]:
        """Up to n tokens drawn from q without replacement, in the order drawn (fewer where q gives fewer
        tokens any mass). One call, not n: the exponential race (Gumbel top-k) ranks tokens by q / E with
        E ~ Exp(1), and its order has the law of drawing one token after another, each from what the
        earlier draws left, renormalized."""
        g = self.generator
        race = torch.empty(q.shape, device=g.device if g is not None else q.device).exponential_(generator=g)
        top = (q / race.to(q.device)).topk(min(n, q.shape[-1]))
        return [t for t, key in zip(top.indices.tolist(), top.values.tolist()) if key > 0]

    def _accept_tree(
        self, tree: DraftTree, tokens: list[int], dists: dict[int, torch.Tensor], dead: set[int],
        t_logits: torch.Tensor, seq: list[int],
    ) -> tuple[list[int], list[int]]:  # fmt: skip
        """Sampled verification of a tree (recursive rejection sampling without replacement: SpecInfer,
        Miao et al. 2024; Jeon et al. 2024): at each node its children are tried in the order they were
        drawn, each kept with probability min(1, p(x) / q(x)); after a rejection p becomes
        max(0, p - q) renormalized and q loses x (the distribution the next child was drawn from). The
        first kept child is the next node; if none is, a token sampled from what p has become ends the
        round (at a leaf: from p itself). Each token is then distributed as the target's own sampling
        would give it. Returns (accepted candidates' indices, new tokens)."""
        path: list[int] = []
        accepted: list[int] = []
        node, row = -1, 0
        while True:
            p = self._dist(self._scores(t_logits[row], seq + accepted))
            q = dists.get(node)
            for c in tree.children.get(node, ()):
                if c in dead:
                    continue
                if self._uniform() < acceptance_probability(p, q, tokens[c]):
                    break
                p = residual(p, q)
                q = q.clone()
                q[tokens[c]] = 0
                q = q / q.sum() if float(q.sum()) > 0 else q
            else:
                return path, [*accepted, self._pick(p)]
            path.append(c)
            accepted.append(tokens[c])
            node, row = c, 1 + c

    def _draft_dynamic(self, plan: DynamicTree, h: torch.Tensor, z, start: int) -> tuple[DraftTree, list[int]]:
        """A dynamic tree (EAGLE-2): the draft expands the `topk` likeliest candidates of each new level
        (one call of `topk` rows per depth); the `size` likeliest of all it drafted are the tree."""
        draft, d_cache, eagle, k = self.draft, self.d_cache, self.eagle, plan.topk
        tokens: dict[tuple[int, ...], int] = {}
        scores: dict[tuple[int, ...], float] = {}  # a candidate's log-probability under the draft

        def branch(parents: list[tuple[int, ...]], hs: torch.Tensor, zs) -> None:
            logp = self._head(draft, hs, zs, full=False).float().log_softmax(-1)  # (rows, V)
            top = logp.topk(k)
            ids = top.indices.tolist()
            if draft.cfg.head_tokens is not None:
                ids = [[draft.cfg.head_tokens[j] for j in row] for row in ids]
            for parent, row, values in zip(parents, ids, top.values.tolist()):
                for r, (token, value) in enumerate(zip(row, values)):
                    tokens[(*parent, r)] = token
                    scores[(*parent, r)] = scores.get(parent, 0.0) + value

        branch([()], h, z)
        states = {(): h}  # an expanded candidate's draft state (1, d): its children's EAGLE input
        level = list(tokens)
        written: list[tuple[int, ...]] = []  # the candidates the draft ran, in the order of its entries
        for _ in range(plan.depth - 1):
            expand = sorted(level, key=lambda p: (-scores[p], p))[:k]
            region = ancestor_rows(written, expand)
            feats = torch.cat([states[p[:-1]] for p in expand])[None] if eagle else None
            hs, zs = self._run_tree(draft, d_cache, [tokens[p] for p in expand], [start + len(expand[0]) - 1] * k,
                                    start, region, feats)  # fmt: skip
            written += expand
            for j, p in enumerate(expand):
                states[p] = hs[j : j + 1]
            branch(expand, hs, zs)
            level = [(*p, r) for p in expand for r in range(k)]
        tree = plan.select(scores)
        return tree, [tokens[p] for p in tree.paths]

    def _tree_round(self, seq: list[int], t_cache, budget: int, h: torch.Tensor, z) -> list[int]:
        """`round` with a candidate tree: the draft's guesses (`_draft_static`,
        `_draft_dynamic`), one check of the newest token and every candidate, the longest path the
        target agrees with (greedy: `DraftTree.walk`; sampled: `_accept_tree`)."""
        stats, d_cache = self.stats, self.d_cache
        start = d_cache.length  # the tree's entries go after the draft's certain ones, and are dropped after
        dists, dead = {}, set()
        if isinstance(self.tree, DynamicTree):
            tree, tokens = self._draft_dynamic(self.tree, h, z, start)
        else:
            tree = self.tree
            tokens, dists, dead = self._draft_static(tree, h, z, start, seq)
        paths, eagle = tree.paths, self.eagle
        # the target: the sequence's tokens it has not read (the newest, at least), then every candidate
        t_start = t_cache.length
        roots = seq[t_start:]
        if len(roots) > 1:  # (a first round without an EAGLE draft: the prompt) read causally first
            self._run(self.target, t_cache, roots[:-1])
            t_start, roots = t_cache.length, roots[-1:]
        newest = len(seq) - 1
        positions = [newest] + [newest + len(p) for p in paths]
        t_hidden, t_z = self._run_tree(self.target, t_cache, roots + tokens, positions, t_start, tree.check_rows)
        t_logits = self._head(self.target, t_hidden, t_z)
        if self.plain:
            path, accepted = tree.walk(1, t_logits.argmax(-1).tolist(), tokens)
        elif not self.config.sampling:  # each row's argmax after the processors, over its own prefix
            prefixes = [seq] + [seq + [tokens[a] for a in tree.ancestors(i)] for i in range(len(paths))]
            best = [int(self._scores(row, prefix).argmax()) for row, prefix in zip(t_logits, prefixes)]
            path, accepted = tree.walk(1, best, tokens)
        else:
            path, accepted = self._accept_tree(tree, tokens, dists, dead, t_logits, seq)
        stats.rounds += 1
        stats.proposed += len(paths)
        stats.accepted += len(path)
        stop_at = next((i + 1 for i, t in enumerate(accepted) if t in self.eos), None)
        new = accepted[:stop_at][:budget]
        stats.generated += len(new)
        # the target keeps the newest token's and the accepted candidates' keys/values, moved up next to
        # each other; the draft drops the tree's entries (its catch-up reads the accepted tokens)
        kept = path[: len(new) - 1]
        t_cache.move([newest + 1 + i for i in kept], newest + 1)
        t_cache.length = newest + len(new)
        d_cache.length = start
        if eagle:  # the target's states the draft reads next: the newest token's, then the accepted candidates'
            self.pending = t_hidden[[0, *(1 + i for i in kept)]]
        return new

    @torch.inference_mode()
    def round(self, seq: list[int], t_cache, budget: int) -> list[int]:
        """One round after `seq` (prompt and tokens so far): the draft proposes up to num_draft_tokens
        tokens, the target checks them in one forward. Returns the new tokens, at most `budget`, ending
        at the first EOS; the caller appends them to `seq`.

        `t_cache` holds the target's keys/values of a prefix of seq[:-1] (any, even none) in one row, and
        `length` can be set back; after the round it holds everything but the newest token."""
        target, draft, stats, eagle = self.target, self.draft, self.stats, self.eagle
        d_cache, confidence, head_ids = self.d_cache, self.confidence, draft.cfg.head_tokens
        k = min(self.num_draft_tokens, budget)
        known = len(seq) - 1  # positions whose target state is known after this round's catch-up
        start = self.base + d_cache.length + len(self.pending)  # the first position whose state is missing
        self.recomputed, self.compiling = 0, False
        if eagle and start > known:
            raise ValueError(f"{len(self.pending)} target states pending from position {start - len(self.pending)}: "
                             f"more than the {known} a sequence of {len(seq)} tokens has")  # fmt: skip
        if eagle and start < known:
            # states the draft will read that nobody computed yet: the target runs over those tokens again
            # (their keys/values come out the same)
            if t_cache.length < start:
                raise ValueError(f"the target's cache holds {t_cache.length} tokens; the draft needs {start}")
            if t_cache.length - start > RECOMPUTE_WINDOW:
                # far behind (many batched steps): rather than rerun them all, the draft starts over on the
                # last RECOMPUTE_WINDOW tokens, reading positions from 0 again (RoPE sees only distances)
                start = self.base = t_cache.length - RECOMPUTE_WINDOW
                d_cache.length, self.pending = 0, self.pending[:0]
            t_cache.length = start
            self.add_states(self._run(target, t_cache, seq[start:known])[0])
            self.recomputed = known - start
        # the draft proposes k tokens, one forward each (its cache catches up on accepted tokens first)
        drafted: list[int] = []
        q: list[torch.Tensor] = []
        done = self.base + d_cache.length  # the sequence position the draft's cache reaches
        self.caught_up = len(seq) - done - (1 if eagle else 0)
        if eagle:
            if len(self.pending):  # (a one-token prompt leaves nothing to read in the first round)
                h, z = self._run(draft, d_cache, seq[done + 1 :], self.pending[None])
            else:
                k = 0
        else:
            h, z = self._run(draft, d_cache, seq[done:])
        if k:
            h, z = h[-1:], (z[-1:] if z is not None else None)
            if self.tree is not None:
                return self._tree_round(seq, t_cache, budget, h, z)
        for i in range(k):
            if self.plain:
                z = self._head(draft, h, z, full=False)[0].float()
                j = int(z.argmax())
                drafted.append(head_ids[j] if head_ids is not None else j)
                sure = float(torch.softmax(z, -1)[j]) if confidence > 0 else 1.0  # (a reduced head's others: p = 0)
            else:
                s = self._scores(self._head(draft, h, z)[0], seq + drafted)
                q.append(self._dist(s))
                drafted.append(self._pick(q[-1]))
                # the draft's probability of its own proposal (greedy: under its softmax)
                sure = float((q[-1] if self.config.sampling else s.softmax(-1))[drafted[-1]]) if confidence > 0 else 1.0
            if sure < confidence:
                break
            if i < k - 1:  # an EAGLE draft reads its own predicted state where the target's is not known
                h, z = self._run(draft, d_cache, drafted[-1:], h[None] if eagle else None)
        k = len(drafted)
        # the target scores all of them in one forward
        t_hidden, t_z = self._run(target, t_cache, seq[t_cache.length :] + drafted)
        t_hidden, t_z = t_hidden[-(k + 1) :], (t_z[-(k + 1) :] if t_z is not None else None)
        t_logits = self._head(target, t_hidden, t_z)
        if self.plain:  # each drafted token stands while it is the target's argmax; the first miss is replaced
            best = t_logits.argmax(-1).tolist()
            n = next((i for i, t in enumerate(drafted) if t != best[i]), k)
            accepted = [*drafted[:n], best[n]]
            stats.accepted += n
        else:
            accepted = self._verify(seq, drafted, q, t_logits)
        stats.rounds += 1
        stats.proposed += k
        stop_at = next((i + 1 for i, t in enumerate(accepted) if t in self.eos), None)
        new = accepted[:stop_at][:budget]
        stats.generated += len(new)
        # roll both caches back to what is now certain (everything but the newest token); an EAGLE
        # draft's drafted positions read its own predicted states, so they go even when accepted
        length = len(seq) + len(new)
        t_cache.length = min(t_cache.length, length - 1)
        d_cache.length = min(d_cache.length, (known if eagle else length - 1) - self.base)
        if eagle:  # the checked positions from `known` on, up to the newest token's
            self.pending = t_hidden[: length - 1 - known]
        return new
