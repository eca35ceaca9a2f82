"""The decode loop: prefill the prompt in one pass, then one token per step with a preallocated KV cache.

The step is kept lean on purpose: for small models the per-step Python and dispatch overhead,
not arithmetic, bounds the speed, so nothing happens in it that could happen once outside.
"""

from __future__ import annotations

import collections
import functools
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmlab.errors import LmlabError
from lmlab.generate import cpu_kernels
from lmlab.generate.config import GenerationConfig
from lmlab.generate.kv_cache import KVCache, PromptCache, StaticKVCache
from lmlab.generate.sampling import apply_processors, build_processors
from lmlab.generate.stream import IncrementalDecoder, StopStrings, text_pieces
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.device import policy


@dataclass
class Generation:
    """One generated sequence."""

    text: str
    token_ids: list[int]  # generated tokens, the stop token included if one ended it
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)


def stop_token_ids(model: Transformer, tokenizer: Tokenizer | None, config: GenerationConfig) -> list[int]:
    """The ids that end a sequence: the config's, else the model's and tokenizer's EOS."""
    if config.stop_token_ids is not None:
        return list(config.stop_token_ids)
    ids = model.cfg.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_token_id(model: Transformer, tokenizer: Tokenizer | None, eos: list[int]) -> int:
    """The id written after a sequence ends: the pad token, else the first EOS, else 0."""
    for candidate in (tokenizer.pad_token_id if tokenizer else None, model.cfg.pad_token_id):
        if candidate is not None:
            return candidate
    return eos[0] if eos else 0


def left_pad(
    rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts padded on the left, as decoders want: (input_ids, attention_mask)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise LmlabError("every prompt needs at least one token", field="prompt")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


class DecodeState:
    """The running batch: token buffer (prompt + generated), mask, which rows have finished.

    `mask` is 1 for real tokens and 0 for padding and for columns not yet generated, over all
    `capacity` columns (>= prompt + max_new_tokens): a static KV cache attends over all of them.
    """

    def __init__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, capacity: int = 0
    ) -> None:
        B, T = input_ids.shape
        self.prompt_len, self.length, self.end = T, T, T + max_new_tokens
        capacity = max(capacity, self.end)
        self.ids = torch.empty((B, capacity), dtype=torch.long, device=input_ids.device)
        self.ids[:, :T] = input_ids
        self.mask = torch.zeros((B, capacity), dtype=torch.long, device=input_ids.device)
        self.mask[:, :T] = attention_mask
        self.padded = not bool(attention_mask.all())  # without padding the model needs no mask at all
        self.finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        self.logprobs = torch.zeros((B, max_new_tokens), device=input_ids.device)

    @property
    def generated(self) -> torch.Tensor:
        """(B, n) tokens generated so far."""
        return self.ids[:, self.prompt_len : self.length]


def new_state(input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig) -> DecodeState:
    """The decode state for a batch; with `config.compile` (True or "auto"), sized for a shared compiled graph."""
    end = input_ids.shape[1] + config.max_new_tokens
    return DecodeState(input_ids, attention_mask, config.max_new_tokens, capacity_for(end) if config.compile else 0)


def precompile(model: Transformer, prompt_len: int, config: GenerationConfig, batch: int = 1) -> _Warmup | None:
    """Start the background compile of the decode graph that `batch` rows of a `prompt_len`-token
    prompt under `config` will run (`new_state`'s capacity), so that it is built before they come: a
    chat compiles while its user types. Only with compile "auto" (the decode loop's background
    compile is this one, looked up by its key; with True the loop compiles in the caller's thread)."""
    if config.compile != "auto":
        return None
    device = next(model.parameters()).device
    return warmup(model, batch, capacity_for(prompt_len + config.max_new_tokens), device)


def compiled(
    model: Transformer, batch: int, capacity: int, key: tuple | None = None, width: int = 0, tree: bool = False
) -> Callable:
    """`model`'s forward under torch.compile for decode steps of `batch` rows over a static cache
    of `capacity` columns; built on first use (one graph serves every step) and kept for reuse.
    With `width` > 0 instead: `width` tokens of one sequence at once, returning their final hidden
    states and head logits (`_rows_forward`), the calls of speculative decoding's rounds; with `tree`
    too, the same called with `tree_mask` and `position_ids` (a round's candidate tree, draft_tree.py).

    Each (model, batch, capacity) gets a compiled function of its own, a copy of `_forward` with
    its own code object. torch.compile keeps at most 8 graphs per code object (dynamo's
    recompile_limit) and then runs that code eagerly, which a long chat or a server would reach;
    and decode steps after the first skip dynamo's guards, which is only safe where the first step
    compiled. The last `_KEEP` are kept. Nothing is attached to the model (it stays deep-copyable
    and collectable): the key holds its id, not the model.

    The graphs carry no guards on the model at all: over a quantized SmolLM2's ~760 tensors they
    cost ~1.7 ms a step (~18% of a 9.5 ms int4 step), checked even under `skip_guard_eval_unsafe`.
    The key holds the model's `fingerprint` instead, checked once per call here: a model changed
    since (a LoRA attached, a layer quantized in place, a weight of another shape, a flag flipped)
    gets a graph of its own. Weights changed in place need none: the graph reads them each step.

    How it compiles is the device policy's choice: on a CPU, inductor's C++ wrapper around the
    decode kernels; on a GPU, the policy's mode ("reduce-overhead": the step replays as one CUDA
    graph, no per-kernel launch cost) and no CPU kernels.
    """
    key = key or _key(model, batch, capacity, width, tree)
    forward = _compiled.pop(key, None)
    if forward is None:
        device = next(model.parameters()).device
        p = policy(device)
        if width:
            template = _rows_forward if p.cpu_kernels else _rows_forward_plain
        else:
            template = _forward if p.cpu_kernels else _forward_plain
        name = f"_{'tree' if tree else 'rows'}_{width}x{capacity}" if width else f"_forward_{batch}x{capacity}"
        code = template.__code__.replace(co_name=name)
        fn = types.FunctionType(code, template.__globals__, code.co_name)
        unguarded = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if p.cpu_kernels:
            forward = torch.compile(fn, dynamic=False, options={**_compile_options(), **unguarded})
        else:
            # torch.compile takes a mode or options, not both: the mode as the options it stands for
            # (no mode: no options; list_mode_options(None) would list every mode's)
            mode = torch._inductor.list_mode_options(p.decode_compile_mode) if p.decode_compile_mode else {}
            forward = torch.compile(fn, dynamic=False, options={**mode, **unguarded})
    _compiled[key] = forward  # most recently used last
    while len(_compiled) > _KEEP:
        _compiled.popitem(last=False)
    return functools.partial(forward, model)


def fingerprint(model: torch.nn.Module) -> int:
    """What a decode graph takes as fixed about `model`: each module's name, type, plain attributes
    (`training`, a LoRA's scale, a quantized layer's group size), functions (an activation) and
    forward hooks; each tensor's name, shape, dtype and device, and which tensors are one (tied
    weights); and the config. Not the weights' values: the graph reads those on every call. (~2 ms
    on SmolLM2, once per generate call.)"""
    parts: list = [repr(getattr(model, "cfg", None))]
    seen: dict[int, int] = {}  # tensor id -> first index: tying or untying weights changes the graph

    def tensor(x: torch.Tensor) -> tuple:
        return x.shape, x.dtype, x.device, seen.setdefault(id(x), len(seen))

    for name, m in model.named_modules():
        parts.append((name, type(m)))
        for k, v in vars(m).items():
            t = type(v)
            if t in _PLAIN:
                parts.append((k, v))
            elif k == "_parameters" or k == "_buffers":
                parts.extend((n, None) if x is None else (n, *tensor(x)) for n, x in v.items())
            elif k == "_forward_hooks" or k == "_forward_pre_hooks":
                parts.append((k, tuple(id(h) for h in v.values())))
            elif issubclass(t, torch.Tensor):
                parts.append((k, *tensor(v)))
            elif t is tuple or t is list:  # a cached table, a list of sizes
                parts.append((k, tuple(tensor(x) if isinstance(x, torch.Tensor) else repr(x) for x in v)))
            elif callable(v) and not isinstance(v, torch.nn.Module):
                parts.append((k, id(v)))  # (by identity: not every callable hashes)
    return hash(tuple(parts))


_PLAIN = frozenset({bool, int, float, str, type(None)})


def _key(model: Transformer, batch: int, capacity: int, width: int = 0, tree: bool = False) -> tuple:
    return (id(model), batch, capacity, fingerprint(model), width, tree)


def _forward(model: Transformer, *args, **kwargs) -> torch.Tensor:
    # the decode kernels' context is traced away: the graph calls the kernels directly
    with cpu_kernels.DecodeKernels():
        return model(*args, **kwargs)


def _forward_plain(model: Transformer, *args, **kwargs) -> torch.Tensor:
    return model(*args, **kwargs)


def _rows_forward(model: Transformer, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    # (hidden states (1, T, d), head logits (1, T, V')): an EAGLE draft reads the states, and a
    # reduced head's logits stay reduced (speculative decoding's greedy draft takes their argmax)
    with cpu_kernels.DecodeKernels():
        h = model.hidden_states(*args, **kwargs)
        return h, model.lm_head(h)


def _rows_forward_plain(model: Transformer, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.hidden_states(*args, **kwargs)
    return h, model.lm_head(h)


def static_cache(model: Transformer, batch: int, capacity: int, key: tuple | None = None) -> StaticKVCache:
    """The static cache a compiled decode runs over. Where the policy replays CUDA graphs, the graph
    writes into the very buffers it was recorded with: one cache per (model, batch, capacity) is
    kept and reused, its buffers marked as static addresses (as transformers' StaticCache does); a
    call that finds it in use gets a fresh one (a new graph is recorded for it). Elsewhere a fresh
    cache per call. Kept caches are keyed like the graphs (`key`: with the model's fingerprint), so a
    model moved to another device or dtype gets buffers that match it."""
    device = next(model.parameters()).device
    if policy(device).decode_compile_mode != "reduce-overhead":
        return StaticKVCache.for_model(model, batch, capacity)
    key = key or _key(model, batch, capacity)
    cache = _caches.get(key)
    if cache is None or cache.in_use:
        cache = StaticKVCache.for_model(model, batch, capacity)
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
        _caches[key] = cache
        while len(_caches) > _KEEP:
            _caches.pop(next(iter(_caches)))
    cache.length = 0
    return cache


_caches: dict[tuple, StaticKVCache] = {}
_compiled: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_KEEP = 16


class _Warmup:
    """A compile of one decode graph running in a background thread: `ready` once the graph is built
    (by one call on a scratch cache of the same shapes), `failed` if building it raised."""

    def __init__(
        self,
        forward: Callable,
        model: Transformer,
        batch: int,
        capacity: int,
        device: torch.device,
        width: int = 0,
        tree: bool = False,
    ) -> None:
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.forward = forward  # the compiled function, once `ready` (not looked up again: it may have left the LRU)
        args = (forward, model, batch, capacity, device, width, tree)
        threading.Thread(target=self._run, args=args, name="lmlab-compile", daemon=True).start()

    def _run(
        self,
        forward: Callable,
        model: Transformer,
        batch: int,
        capacity: int,
        device: torch.device,
        width: int,
        tree: bool,
    ) -> None:
        try:
            with torch.inference_mode():
                cache = StaticKVCache.for_model(model, batch, capacity)
                cache.advance(max(width, 1))
                mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
                if width:  # the call speculative decoding makes (generate/speculative.py)
                    tokens = torch.zeros(1, width, dtype=torch.long, device=device)
                    if tree:
                        see = torch.ones(1, 1, width, capacity, dtype=torch.bool, device=device)
                        pos = torch.arange(width, device=device)[None]
                        forward(tokens, tree_mask=see, position_ids=pos, kv_cache=cache, **rows_features(model, width))
                    else:
                        forward(tokens, attention_mask=mask, kv_cache=cache, **rows_features(model, width))
                else:
                    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
                    forward(token, attention_mask=mask, kv_cache=cache, logits_to_keep=1)
        except BaseException as e:  # a failed compile leaves the eager steps running: say why, once
            self.failed = e
            warnings.warn(f"lmlab: compiling the decode step failed, decoding stays eager: {e}", stacklevel=1)
        finally:
            self.ready.set()


def rows_features(model: Transformer, width: int, features: torch.Tensor | None = None) -> dict:
    """The `features` argument of a width-`width` rows graph: an EAGLE draft's (1, width, d) input (zeros
    where none are given), nothing for other models (the graph is built for one or the other)."""
    if not model.cfg.eagle:
        return {}
    p = next(model.parameters())
    if features is None:
        return {"features": torch.zeros(1, width, model.cfg.d_model, dtype=p.dtype, device=p.device)}
    return {"features": features}


def warmup(
    model: Transformer,
    batch: int,
    capacity: int,
    device: torch.device,
    key: tuple | None = None,
    width: int = 0,
    tree: bool = False,
) -> _Warmup:
    """The background compile of (model, batch, capacity)'s decode graph (or of its `width`-token rows
    graph, `tree`: called with a tree mask), started on first request."""
    key = key or _key(model, batch, capacity, width, tree)
    with _warm_lock:
        w = _warming.get(key)
        if w is None or (w.ready.is_set() and key not in _compiled):
            forward = compiled(model, batch, capacity, key, width, tree)
            w = _warming[key] = _Warmup(forward, model, batch, capacity, device, width, tree)
            while len(_warming) > _KEEP:
                _warming.pop(next(iter(_warming)))
    return w


_warming: dict[tuple, _Warmup] = {}
_warm_lock = threading.Lock()


def compiles_pending() -> int:
    """How many background graph compiles are still running (0: none)."""
    with _warm_lock:
        return sum(not w.ready.is_set() for w in _warming.values())


def wait_for_compiles() -> None:
    """Block until every background compile has finished."""
    with _warm_lock:
        pending = list(_warming.values())
    for w in pending:
        w.ready.wait()


def _compile_options() -> dict:
    """Inductor options for decode steps.

    - cpp_wrapper: the graph's launcher in C++ rather than Python; a step calls some hundred
      kernels, and their Python-side calls cost ~2% of a SmolLM2 step at batch 1.
    - The weight matmuls and attention run as the decode kernels of cpu_kernels.py where they can
      (`_forward`). Elsewhere (no AVX-512, no compiler):
    - each one-row matmul (batch-1 decode) becomes a fused multiply-sum. A decode step at batch 1
      is a chain of matrix-vector products, bound by reading the weights; inductor's reduction
      kernel streams them faster than the BLAS call on this kind of CPU (27 vs 24 GB/s on
      SmolLM2's 211 products, 2 cores). Inductor's pass decomposes only matrices up to 2048 wide on
      CPU, which leaves out the vocabulary projection, the largest; the limit is a module constant
      of torch's (read once at import), so it is raised there.
    """
    options = {"cpp_wrapper": True}
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass
    except ImportError:  # a torch without this pass: plain matmuls, still correct
        return options
    widest = 1 << 30
    mm_pass.cpu_max_other_dimension_decomposition = max(mm_pass.cpu_max_other_dimension_decomposition, widest)
    # named in the options too, so that inductor's on-disk cache tells these graphs apart
    options["post_grad_fusion_options"] = {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": widest}}
    return options


def capacity_for(length: int) -> int:
    """Static-cache columns for `length` tokens: the next power of two from 64, so that prompts of
    different lengths share one compiled graph instead of compiling one each (a conversation that
    grows to 4k tokens compiles 7). Spare columns cost memory, and little time: the decode
    attention kernel stops at the last written column."""
    return max(64, 1 << (length - 1).bit_length())


@torch.inference_mode()
def decode_steps(
    model: Transformer,
    state: DecodeState,
    config: GenerationConfig,
    eos: list[int],
    pad_id: int,
    past: PromptCache | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; yields each step's tokens (B,). Rows the caller marks in
    `state.finished` (a stop string, a cancelled request) stop like rows that produced EOS.

    `past` (one unpadded row): keys/values kept from an earlier call; the prompt's part that begins
    with them is not run again, and when the steps end `past` keeps this call's (the prompt and the
    tokens fed back so far) for the next."""
    B = state.ids.shape[0]
    owner, reused = None, 0
    if past is not None:
        if B != 1 or state.padded:
            raise ValueError("a prompt cache serves one unpadded row")
        owner = prompt_cache_owner(model)
        reused = past.reusable(state.ids[0, : state.prompt_len].tolist(), owner)
    procs = build_processors(config, state.prompt_len, config.sampling, state.mask[:, : state.prompt_len])
    generator = None
    if config.sampling and config.seed is not None:
        generator = torch.Generator(device=state.ids.device).manual_seed(config.seed)
    eos_t = torch.tensor(eos, device=state.ids.device)
    background = config.compile == "auto"
    kernels = cpu_kernels.for_rows(B, state.ids.device)
    if config.compile:
        # a static cache over all of the state's columns; the prompt runs eagerly (its length varies),
        # every decode step through one compiled graph ("auto": eager steps over the same cache until
        # the graph, compiling in the background, is ready)
        key = _key(model, B, state.ids.shape[1])
        cache = static_cache(model, B, state.ids.shape[1], key)
        warm = warmup(model, B, state.ids.shape[1], state.ids.device, key) if background else None
        forward = compiled(model, B, state.ids.shape[1], key)
        if past is not None:
            past.fill(cache, reused)
        cache.advance(state.length - reused)
        logits = model(state.ids[:, reused : state.length], attention_mask=state.mask, kv_cache=cache,
                       logits_to_keep=1)  # fmt: skip
        first_compiled = None  # the step at which the graph was first used (its guards are checked then)
    else:
        cache, forward = KVCache.for_model(model, B, state.end), model
        if past is not None:
            past.fill(cache, reused)
        mask = state.mask[:, : state.length] if state.padded else None
        logits = model(state.ids[:, reused : state.length], attention_mask=mask, kv_cache=cache, logits_to_keep=1)
    fed = state.length  # tokens whose keys/values the cache holds (a step's token is fed on the next step)
    logits = logits[:, -1]
    cache.in_use = True
    try:
        for step in range(state.end - state.prompt_len):
            scores = apply_processors(procs, state.ids[:, : state.length], logits.float())
            if config.sampling:
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(state.finished, pad_id, nxt)
            if config.logprobs:
                state.logprobs[:, step] = logits.float().log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
            state.ids[:, state.length] = nxt
            state.mask[:, state.length] = 1
            state.length += 1
            if eos:
                state.finished |= torch.isin(nxt, eos_t)
            yield nxt
            if bool(state.finished.all()) or state.length == state.end:
                return
            if config.compile:
                cache.advance(1)
                if background and (not warm.ready.is_set() or warm.failed is not None):
                    with kernels:  # the graph is not ready (or failed): this step runs eagerly
                        logits = model(nxt[:, None], attention_mask=state.mask, kv_cache=cache, logits_to_keep=1)
                    fed = state.length
                    logits = logits[:, -1]
                    continue
                first_compiled = step if first_compiled is None else first_compiled
                # after the first compiled step the graph is known to fit (same model, cache and shapes), so
                # its guards, ~1 ms of checks over every weight and cache tensor, need not run again
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=step > first_compiled):
                    logits = forward(nxt[:, None], attention_mask=state.mask, kv_cache=cache, logits_to_keep=1)
            else:
                mask = state.mask[:, : state.length] if state.padded else None
                with kernels:
                    logits = forward(nxt[:, None], attention_mask=mask, kv_cache=cache, logits_to_keep=1)
            fed = state.length
            logits = logits[:, -1]
    finally:
        cache.in_use = False  # also when the caller stops early (a stop string, a closed stream)
        if past is not None:  # (a step cut short by an exception left `fed` at the last whole one)
            shared = any(c is cache for c in _caches.values())
            past.keep(cache, state.ids[0, :fed].tolist(), owner, shared=shared)


def prompt_cache_owner(model: Transformer) -> tuple[int, int]:
    """Which model a PromptCache's keys/values belong to: the model and its `fingerprint` (a LoRA
    attached or a layer quantized since gives other keys and values)."""
    return id(model), fingerprint(model)


def generate_ids(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    eos: list[int] | None = None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Token-level generation, shaped like transformers' `generate`: (B * n, prompt + new) with
    `pad_id` after each sequence's end. Beam search when config.num_beams > 1."""
    config = config or GenerationConfig()
    eos = stop_token_ids(model, None, config) if eos is None else eos
    pad_id = pad_token_id(model, None, eos) if pad_id is None else pad_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if config.num_beams > 1:
        from lmlab.generate.beam import beam_search

        return beam_search(model, input_ids, attention_mask, config, eos, pad_id)
    n = config.num_return_sequences
    if n > 1:
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
    state = new_state(input_ids, attention_mask, config)
    for _ in decode_steps(model, state, config, eos, pad_id):
        pass
    return state.ids[:, : state.length]


def _as_token_rows(tokenizer: Tokenizer | None, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise LmlabError("text prompts need a tokenizer", field="prompts")
            rows.append(tokenizer.encode(p))
        else:
            rows.append(list(p))
    return rows


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: str | list[str] | list[int] | list[list[int]],
    config: GenerationConfig | None = None,
    past: PromptCache | None = None,
    **overrides,
) -> list[Generation]:
    """Generate for one prompt or a batch (text or token ids); returns num_return_sequences results per
    prompt, in prompt order. Keyword arguments override fields of `config`. `past` (one prompt, one
    sequence): keys/values kept by an earlier call, as in `stream`."""
    config = (config or GenerationConfig()).replace(**overrides) if overrides else (config or GenerationConfig())
    rows = _as_token_rows(tokenizer, prompts)
    if past is not None and (len(rows) > 1 or config.num_return_sequences > 1 or config.num_beams > 1):
        raise LmlabError("a prompt cache (past) serves one prompt and one sequence, without beams", field="past")
    limit = model.cfg.max_seq_len if model.cfg.pos == "learned" else None
    if limit is not None and max(map(len, rows)) + config.max_new_tokens > limit:
        raise LmlabError(f"prompt + max_new_tokens exceeds the model's {limit} positions", field="max_new_tokens")
    eos = stop_token_ids(model, tokenizer, config)
    pad_id = pad_token_id(model, tokenizer, eos)
    device = next(model.parameters()).device
    input_ids, mask = left_pad(rows, pad_id, device)
    n = config.num_return_sequences
    prompt_lens = [len(r) for r in rows for _ in range(n)]
    stops = StopStrings(config.stop)
    if config.num_beams > 1:
        out = generate_ids(model, input_ids, mask, config, eos, pad_id)
        new = out[:, input_ids.shape[1] :].tolist()
        return [_finish(tokenizer, seq, eos, plen, stops) for plen, seq in zip(prompt_lens, new)]
    if n > 1:
        input_ids, mask = input_ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    state = new_state(input_ids, mask, config)
    # with stop strings, follow each row's text so a row can stop as soon as one appears
    decoders = [IncrementalDecoder(tokenizer) for _ in prompt_lens] if stops.stops and tokenizer else []
    for nxt in decode_steps(model, state, config, eos, pad_id, past):
        for row, decoder in enumerate(decoders):
            if not bool(state.finished[row]):
                before = len(decoder.text)
                decoder.push(int(nxt[row]))
                if stops.find(decoder.text, before) is not None:
                    state.finished[row] = True
    results = []
    for row, (plen, seq) in enumerate(zip(prompt_lens, state.generated.tolist())):
        g = _finish(tokenizer, seq, eos, plen, stops)
        if config.logprobs:
            g.logprobs = state.logprobs[row, : len(g.token_ids)].tolist()
        results.append(g)
    return results


def _finish(tokenizer: Tokenizer | None, seq: list[int], eos: list[int], plen: int, stops: StopStrings) -> Generation:
    """Trim a row at its stop token, decode it, and cut the text before the first stop string."""
    end = next((i + 1 for i, t in enumerate(seq) if t in eos), None)
    ids = seq[:end] if end is not None else seq
    text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
    reason = "stop" if end is not None else "length"
    if reason == "length":
        text = text.rstrip("\ufffd")  # a character cut in half by the token limit
    at = stops.find(text, 0)
    if at is not None:
        text, reason = text[:at], "stop"
    return Generation(text=text, token_ids=ids, finish_reason=reason, prompt_tokens=plen)


@torch.inference_mode()
def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    config: GenerationConfig | None = None,
    past: PromptCache | None = None,
    **overrides,
) -> Iterator[str]:
    """Generate for one prompt, yielding text pieces as soon as they are complete characters; stop
    strings are never shown (text that could begin one is held back until it cannot). With `past`,
    the prompt's part that an earlier call kept there is not run again (`decode_steps`)."""
    config = (config or GenerationConfig()).replace(**overrides) if overrides else (config or GenerationConfig())
    if config.num_beams > 1 or config.num_return_sequences > 1:
        raise LmlabError("streaming takes one sequence: num_beams and num_return_sequences must be 1")
    eos = stop_token_ids(model, tokenizer, config)
    pad_id = pad_token_id(model, tokenizer, eos)
    input_ids, mask = left_pad(_as_token_rows(tokenizer, prompt), pad_id, next(model.parameters()).device)
    state = new_state(input_ids, mask, config)
    steps = decode_steps(model, state, config, eos, pad_id, past)
    try:
        yield from text_pieces((int(nxt[0]) for nxt in steps), tokenizer, eos, config.stop)
    finally:
        steps.close()  # an EOS or a stop string ends the text: the steps release their cache now
