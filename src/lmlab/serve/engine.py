"""Continuous batching: one scheduler thread owns the model and decodes every running request together.

Each scheduler step:
1. drops cancelled (client gone) and timed-out requests, freeing their rows at once;
2. admits waiting requests, first come first served, while free rows remain (an idle engine first
   lets a burst of arrivals gather for a few milliseconds). Prompts are prefilled together: the
   part they share with a cached prompt (a system prompt) comes from the prefix cache, a prefix a
   new burst shares is computed once, and the rest of every prompt goes through one left-padded
   forward per group; each prompt's first token is chosen from it, and its keys/values are copied
   into a free row of the shared `SlotKVCache` (see batch_cache.py for the layout);
3. runs ONE forward over all live rows, one new token each: with `compile`, a compiled graph over
   the next batch-size bucket of rows (1, 2, 4, ... max_batch; the rows past the live ones are
   padding), as `generate`'s compiled steps; each (bucket, cache width) graph compiles in a
   background thread when first needed, one at a time, and eager steps serve until it is ready;
4. chooses each row's token with the row's own processors and random generator (per-request
   temperature, top-p, top-k, penalties and seed), turns tokens into text deltas
   (IncrementalDecoder + StopStrings, as `lmlab.generate.stream` does) and hands them to the
   request's callback, which the HTTP layer points at an asyncio queue;
5. frees the rows that finished (EOS, a stop string, max_tokens).

With a draft model (`lmlab serve --draft`), a sequence that decodes alone (one live row, nobody
waiting, no logprobs asked for, no seed) may go by speculative rounds instead of step 3, while they
measure faster than plain steps (generate/speculation_policy.py): the draft proposes a few tokens and the
target checks them in one forward (generate/speculative.py), with the row's own processors and
generator, so greedy answers stay the target's own. With several rows the batched step
already reads each weight once for all of them, and checking drafts would multiply the rows' work, so
speculation stops while others run (as vLLM's `disable_by_batch_size`); the sequence's draft state is
kept and catches up when it is alone again.

The HTTP side never touches the model: it submits requests, cancels them, and queues jobs
(embeddings) that run in this thread between steps.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.generate import cpu_kernels, decode
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import left_pad, pad_token_id, stop_token_ids
from lmlab.generate.draft_tree import DraftTree, DynamicTree, parse_tree
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import apply_processors, build_processors
from lmlab.generate.speculation_policy import SpeculationPolicy
from lmlab.generate.speculative import (
    DRAFT_CONFIDENCE,
    Speculation,
    SpeculativeStats,
    check_draft,
    resolve_tree,
    round_room,
)
from lmlab.generate.stream import IncrementalDecoder, StopStrings
from lmlab.model.transformer import Transformer
from lmlab.serve.batch_cache import SlotKVCache
from lmlab.serve.metrics import Counter, Gauge, Histogram, Registry
from lmlab.serve.prefix_cache import PrefixCache, common_prefix
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.device import policy
from lmlab.utils.threads import release_openmp_pool

log = logging.getLogger("lmlab.serve")

PREFILL_TOKENS = 4096
"""Padded prompt tokens prefilled in one forward at most (a longer burst is split by length)."""

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --- events handed to a request's callback -------------------------------------------------------------


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, with the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of choice `index` (possibly empty while a character or a stop string is pending)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # set on the choice's last delta: "stop" or "length"


@dataclass
class Done:
    """Every choice of the request has finished."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request ended without finishing (timeout, server error)."""

    message: str
    status: int
    type: str
    code: str | None = None


Event = Delta | Done | Failed


class QueueFull(Exception):
    """The waiting queue is at its bound: the HTTP layer answers 429."""


@dataclass(eq=False)
class Request:
    """A generation request: prompt tokens, settings, and where its events go."""

    prompt_ids: list[int]
    config: GenerationConfig  # max_new_tokens, sampling settings, stop strings, seed, num_return_sequences
    on_event: Callable[[Event], Any]
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's plus the k most likely
    ignore_eos: bool = False  # keep going past EOS (fixed-length benchmarks)
    timeout: float | None = None  # seconds from submission, queueing included
    # filled in by the engine
    submitted: float = 0.0
    first_token_at: float | None = None
    completion_tokens: int = 0
    cancelled: bool = False
    unfinished: int = 0

    @property
    def n(self) -> int:
        """How many choices (rows) the request needs."""
        return self.config.num_return_sequences

    def expired(self, now: float) -> bool:
        """Past its timeout."""
        return self.timeout is not None and now - self.submitted > self.timeout


class _Sequence:
    """One choice of a request while it occupies a row: its tokens, sampler and text state."""

    def __init__(self, req: Request, index: int, tokenizer: Tokenizer) -> None:
        cfg = req.config
        self.req, self.index = req, index
        self.ids = list(req.prompt_ids)  # prompt + generated: what penalties look at
        self.generated = 0
        self.procs = build_processors(cfg, len(req.prompt_ids), cfg.sampling)
        self.generator = None
        if cfg.sampling:
            seed = cfg.seed + index if cfg.seed is not None else random.randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)
        self.plain_greedy = not cfg.sampling and not self.procs
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(cfg.stop)
        self.shown = 0  # characters of decoder.text already sent
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        self.finished = False
        self.spec: Speculation | None = None  # its speculative state, from its first round alone
        self.states: torch.Tensor | None = None  # the prompt's final hidden states, for an EAGLE draft
        # whether the target states an EAGLE draft will read (`states`, or `spec.pending`) reach the newest
        # fed token: lone plain steps hand theirs on, so a round after them need not run the target again
        self.synced = False

    @property
    def last(self) -> int:
        """The token the next decode step feeds."""
        return self.ids[-1]


class Engine:
    """The scheduler: submit requests from any thread; one background thread decodes them in a shared batch."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        cache_columns: int = 256,
        prefix_cache_tokens: int = 4096,
        gather_ms: float = 5.0,
        compile: bool = False,
        registry: Registry | None = None,
        draft: Transformer | None = None,
        num_draft_tokens: int = 4,
        draft_confidence: float = DRAFT_CONFIDENCE,
        speculate: str = "auto",
        draft_tree: DraftTree | DynamicTree | str | None = "auto",
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise LmlabError("max_batch must be >= 1 and max_queue >= 0", field="max_batch")
        if max_context is not None and max_context < 2:
            raise LmlabError("max_context must be >= 2 tokens (a prompt and one answer token)", field="max_context")
        self.model, self.tokenizer = model.eval(), tokenizer
        if draft is not None:
            check_draft(model, draft)
            if num_draft_tokens < 1:
                raise LmlabError("num_draft_tokens must be >= 1", field="num_draft_tokens")
        self.draft = draft.eval() if draft is not None else None
        self.eagle = draft is not None and draft.cfg.eagle  # the draft reads the target's hidden states
        self.num_draft_tokens, self.draft_confidence = num_draft_tokens, draft_confidence
        # a lone row's rounds check this candidate tree ("auto": the device's default; None: a chain)
        self.draft_tree = draft_tree if draft_tree in ("auto", None) else parse_tree(draft_tree)
        self.spec_stats = SpeculativeStats()  # all sequences' rounds together
        self.policy = SpeculationPolicy(speculate)  # rounds or plain steps for a lone row: the faster, measured
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.device = next(model.parameters()).device
        self.eos = stop_token_ids(model, tokenizer, GenerationConfig())
        self.pad_id = pad_token_id(model, tokenizer, self.eos)
        self.cache_columns = cache_columns  # the shared cache's first (and after each idle spell, only) width
        self.cache = self._new_cache() if model.cfg.causal else None
        self.prefixes = PrefixCache(prefix_cache_tokens)  # recent prompts' K/V (prefix_cache_tokens=0: off)
        # an idle engine lets a burst gather before its prefill: until no request has come for gather_ms
        # (at most 4 x gather_ms), as dynamic batchers' queue delay (Triton) does; 0: admit at once
        self.gather_s = gather_ms / 1000
        self._last_arrival = 0.0
        self._rows: list[_Sequence] = []  # row i of the cache holds self._rows[i]
        self._active: set[Request] = set()
        self._completed: list[Request] = []  # finished, Done not sent yet
        self._waiting: deque[Request] = deque()
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._token_info: dict[int, tuple[str, list[int]]] = {}
        self._thread = threading.Thread(target=self._loop, name="lmlab-scheduler", daemon=True)
        # compiled decode steps: ready graphs by (bucket rows, cache columns); the compiles wanted, in
        # order; the one compiling now; those that failed (their steps stay eager). Not where the device
        # policy replays CUDA graphs: those want static cache addresses, which these views are not.
        self.compile = bool(compile) and self.cache is not None and policy(self.device).cpu_kernels
        self._graphs: dict[tuple[int, int], Any] = {}
        self._checked: set[tuple[int, int]] = set()  # graphs whose guards were checked once
        self._wanted: list[tuple[int, int]] = []
        self._compiling: tuple[tuple[int, int], Any, float] | None = None
        self._failed: set[tuple[int, int]] = set()
        self._rows1: dict[int, Any] = {}  # cache width -> the target's one-token rows graph's compile
        if self.compile:
            self._wanted.append((1, self.cache.capacity))  # a lone chat first; other buckets when needed
        self._init_metrics(registry or Registry())

    def _init_metrics(self, r: Registry) -> None:
        self.registry = r
        self.m_generated = r.add(Counter("lmlab_generated_tokens_total", "Tokens generated"))
        self.m_prompt = r.add(Counter("lmlab_prompt_tokens_total", "Prompt tokens prefilled"))
        self.m_steps = r.add(Counter("lmlab_decode_steps_total", "Batched decode forwards"))
        self.m_prefills = r.add(Counter("lmlab_prefill_forwards_total", "Prompt forwards (a burst shares one)"))
        self.m_compiled = r.add(Counter("lmlab_decode_steps_compiled_total", "Decode forwards run as a compiled graph"))
        self.m_prefix_tokens = r.add(
            Counter("lmlab_prefix_cache_tokens_total", "Prompt tokens reused from the prefix cache")
        )
        self.m_spec_rounds = r.add(Counter("lmlab_speculative_rounds_total", "Speculative rounds (target forwards)"))
        self.m_drafted = r.add(Counter("lmlab_draft_tokens_proposed_total", "Tokens the draft proposed"))
        self.m_draft_ok = r.add(Counter("lmlab_draft_tokens_accepted_total", "Drafted tokens the target accepted"))
        if self.draft is not None:
            r.add(
                Gauge(
                    "lmlab_speculation_speedup",
                    "A lone row's measured tokens/s by speculative rounds over plain steps (0: not measured yet)",
                    lambda: self.policy.speedup() or 0.0,
                )
            )
        self.m_stopped = r.add(Counter("lmlab_requests_aborted_total", "Requests stopped early, by reason", ["reason"]))
        self.m_rows = r.add(
            Histogram("lmlab_batch_rows_per_step", "Rows decoded together per step", buckets=(1, 2, 4, 8, 16, 32, 64))
        )
        self.m_ttft = r.add(
            Histogram("lmlab_time_to_first_token_seconds", "Submission to first token", buckets=TTFT_BUCKETS)
        )
        r.add(Gauge("lmlab_requests_running", "Requests holding rows of the batch", lambda: len(self._active)))
        r.add(Gauge("lmlab_requests_waiting", "Requests queued for a row", lambda: len(self._waiting)))
        r.add(Gauge("lmlab_batch_rows", "Rows (sequences) in the running batch", lambda: len(self._rows)))
        r.add(Gauge("lmlab_decode_graphs_ready", "Compiled decode graphs built", lambda: len(self._graphs)))
        r.add(
            Gauge(
                "lmlab_decode_graphs_pending",
                "Decode graphs compiling or waiting to compile (speculative rounds' graphs included)",
                lambda: len(self._wanted) + decode.compiles_pending(),
            )
        )
        r.add(Gauge("lmlab_kv_cache_used_tokens", "Real tokens held in the KV cache", self.kv_used_tokens))
        r.add(
            Gauge(
                "lmlab_kv_cache_capacity_tokens",
                "Token slots allocated (rows x columns)",
                lambda: self.cache.capacity_tokens() if self.cache else 0,
            )
        )
        r.add(
            Gauge(
                "lmlab_kv_cache_usage_ratio",
                "Used over allocated KV-cache token slots",
                lambda: self.cache.used_tokens() / self.cache.capacity_tokens() if self.cache else 0.0,
            )
        )
        r.add(
            Gauge(
                "lmlab_kv_cache_bytes",
                "Memory of the KV-cache buffers",
                lambda: self.cache.nbytes() if self.cache else 0,
            )
        )

    # --- public API (any thread) ----------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the scheduler thread. The calling thread's idle OpenMP workers are handed back first:
        while two threads keep OpenMP pools on a machine with few cores, libgomp stops spinning between
        parallel regions and the scheduler's steps ran 2.5x slower (utils/threads.py). (Parallel work in
        the calling thread later starts its pool again; `serve_forever` in the main thread avoids that.)"""
        release_openmp_pool()
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the scheduler in the calling thread until `close()` (from another thread).

        `lmlab serve` runs it in the process's main thread, with the HTTP server in a thread of its
        own, so that the thread that loaded the model (and started an OpenMP pool doing so) is the one
        that runs its steps: a second thread's steps are slow while the first's pool lives
        (utils/threads.py; `benchmarks/thread_steps.py`)."""
        self._loop()

    def precompile(self, rows: list[int] | None = None, columns: list[int] | None = None) -> None:
        """Compile the decode graphs for these batch-size buckets (default: all) at these cache widths
        (default: the cache's first) now, before serving, instead of in the background when first
        needed. Call before `start()`/`serve_forever()`."""
        if not self.compile:
            return
        every = range(1, self.max_batch + 1)
        buckets = sorted({self._bucket(r) for r in (rows or every)})
        for width in columns or [self.cache.capacity]:
            for bucket in buckets:
                key = (bucket, width)
                if key in self._graphs or key in self._failed:
                    continue
                warm = decode.warmup(self.model, bucket, width, self.device)
                warm.ready.wait()
                if warm.failed is None:
                    self._graphs[key] = warm.forward
                else:
                    self._failed.add(key)

    def close(self) -> None:
        """Stop the scheduler; requests still waiting or running get a Failed event."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def submit(self, req: Request) -> Request:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting."""
        if not self.model.cfg.causal:
            raise LmlabError("this model is an encoder: it embeds text but cannot generate it", field="model")
        if req.n > self.max_batch:
            raise LmlabError(f"n must be <= {self.max_batch} (the server's --max-batch)", field="n")
        req.submitted = time.monotonic()
        req.unfinished = req.n
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._last_arrival = req.submitted
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away): it leaves the queue now, or its rows at the next step."""
        with self._cv:
            if req.cancelled or (req.unfinished == 0 and req not in self._waiting):
                return
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
            self.m_stopped.inc(reason="cancelled")
            self._cv.notify()

    def run(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` in the scheduler thread between steps (it owns the model); returns a Future."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._jobs.append((fn, fut))
            self._cv.notify()
        return fut

    def embed(self, rows: list[list[int]], batch: int = 32) -> Future:
        """Mean-pooled, L2-normalized final hidden states of each token row (a Future of lists)."""

        def job() -> list[list[float]]:
            out = []
            for i in range(0, len(rows), batch):
                ids, mask = left_pad(rows[i : i + batch], self.pad_id, self.device)
                h = self.model.hidden_states(ids, attention_mask=mask).float()  # (B, T, d)
                m = mask[..., None].to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1)
                out.extend(torch.nn.functional.normalize(pooled, dim=-1).tolist())
            return out

        return self.run(job)

    @property
    def running_requests(self) -> int:
        """Requests holding rows."""
        return len(self._active)

    @property
    def waiting_requests(self) -> int:
        """Requests queued for a row."""
        return len(self._waiting)

    def kv_used_tokens(self) -> int:
        """Real tokens in the shared cache."""
        return self.cache.used_tokens() if self.cache else 0

    # --- the scheduler thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._rows and not self._jobs:
                        if self._compiling is not None or self._wanted:  # idle: keep the compiles going
                            self._cv.wait(0.2)
                            break
                        self._cv.wait()
                    if not self._rows:
                        self._gather()
                    if self._closed:
                        break
                    jobs, self._jobs = self._jobs, []
                for fn, fut in jobs:
                    try:
                        fut.set_result(fn())
                    except Exception as e:
                        fut.set_exception(e)
                try:
                    self._reap()
                    self._admit()
                    if self.compile:
                        self._poll_compiles()
                    if self._rows:
                        self._lone_step() if self._alone() else self._decode_step()
                except Exception as e:  # a bug must not take the server down: fail what was running
                    log.exception("scheduler step failed")
                    self._fail_running(f"internal error: {e}")
        self._fail_running("the server is shutting down")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            jobs, self._jobs = self._jobs, []
        for req in waiting:
            self._emit(req, Failed("the server is shutting down", 503, "server_error"))
        for _, fut in jobs:
            fut.set_exception(RuntimeError("the engine is closed"))

    def _gather(self) -> None:
        """(Lock held, nothing running.) Wait while requests are still arriving, so that 16 clients
        sending at once (their requests reach the engine over a few milliseconds) share one prefill
        instead of the first one or two running alone while the rest wait for them."""
        end = time.monotonic() + 4 * self.gather_s
        while self._waiting and not self._closed and sum(r.n for r in self._waiting) < self.max_batch:
            now = time.monotonic()
            wait = min(self._last_arrival + self.gather_s, end) - now
            if wait <= 0:
                return
            self._cv.wait(wait)

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.on_event(event)
        except Exception:  # the receiving side is gone (its event loop closed): stop the work
            req.cancelled = True

    def _reap(self) -> None:
        """Free the rows of cancelled and timed-out requests; fail timed-out waiting ones."""
        now = time.monotonic()
        expired = []
        with self._cv:
            for req in list(self._waiting):
                if req.expired(now):
                    self._waiting.remove(req)
                    expired.append(req)
        for req in self._active:
            if not req.cancelled and req.expired(now):
                expired.append(req)
        for req in expired:
            self.m_stopped.inc(reason="timeout")
            self._emit(req, Failed(f"the request took longer than {req.timeout:g}s", 504, "timeout_error", "timeout"))
            req.cancelled = True
        for seq in self._rows:
            if seq.req.cancelled:
                seq.finished = True
        self._free_finished()

    def _admit(self) -> None:
        """Admit waiting requests while rows are free, prefilling a burst of arrivals together.

        A prompt's first tokens may already have K/V in the prefix cache (an earlier prompt with the
        same system prompt); when several new prompts share a prefix that is not cached yet, it is
        prefilled once, on its own, and cached first. Only what each prompt has beyond its cached
        prefix is then computed: prompts sorted by that length, in groups of up to PREFILL_TOKENS
        padded tokens, each group one forward (one matmul per weight for all of them instead of one
        per prompt, so the last of 16 simultaneous requests gets its first token about as soon as
        the first)."""
        admitted, rows = [], len(self._rows)
        with self._cv:
            while self._waiting and rows + self._waiting[0].n <= self.max_batch:
                req = self._waiting.popleft()
                admitted.append(req)
                rows += req.n
        if not admitted:
            return
        try:
            self._prefill_all(admitted)
        except Exception:  # a failed forward (out of memory): requests without rows yet must hear of it too
            for req in admitted:
                if req not in self._active and not req.cancelled:
                    self._emit(req, Failed("internal error while prefilling the prompt", 500, "server_error"))
                    req.cancelled = True
            raise

    def _prefill_all(self, admitted: list[Request]) -> None:
        hits = [self.prefixes.lookup(r.prompt_ids) for r in admitted]
        by_start: dict[tuple[int, ...], list[list[int]]] = {}  # new prompts, by their first tokens
        for r, h in zip(admitted, hits):
            if h is None:
                by_start.setdefault(tuple(r.prompt_ids[: self.prefixes.min_match]), []).append(r.prompt_ids)
        shared = [self._cache_shared_prefix(ps) for ps in by_start.values() if len(ps) > 1]
        if any(shared):
            hits = [h or self.prefixes.lookup(r.prompt_ids) for r, h in zip(admitted, hits)]
        todo = sorted(zip(admitted, hits), key=lambda rh: len(rh[0].prompt_ids) - (rh[1][0] if rh[1] else 0))
        group: list[tuple[Request, tuple | None]] = []
        for req, hit in todo:
            rest = len(req.prompt_ids) - (hit[0] if hit else 0)  # the longest so far: sorted ascending
            if group and (len(group) + 1) * rest > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append((req, hit))
        self._prefill(group)

    def _cache_shared_prefix(self, prompts: list[list[int]]) -> bool:
        """Prefill the prefix that all of `prompts` share (short of each one's last token) once, into
        the prefix cache; False when it is too short to be worth it or the cache is off. (The
        prompts are grouped by their first tokens first, so one unrelated prompt in a burst does not
        stop the others from sharing.)"""
        n = min(len(p) for p in prompts) - 1
        first = tuple(prompts[0])
        for p in prompts[1:]:
            n = min(n, common_prefix(first, p))
        if n < self.prefixes.min_match or n > self.prefixes.max_tokens:
            return False
        ids = torch.tensor([prompts[0][:n]], device=self.device)
        tmp = KVCache.for_model(self.model, 1, n)
        self.m_prefills.inc()
        with cpu_kernels.for_rows(1, self.device):
            h = self.model.hidden_states(ids, kv_cache=tmp)[0]  # (n, d)
        self.prefixes.add(prompts[0][:n], tmp.k[:, 0], tmp.v[:, 0], h if self.eagle else None)
        return True

    def _prefill(self, group: list[tuple[Request, tuple[int, torch.Tensor, torch.Tensor] | None]]) -> None:
        """One forward over the uncached part of each prompt in `group` (request, prefix-cache hit or
        None), its first token(s), then each prompt's K/V into free rows (and the prefix cache).

        Row layout, W = the longest prompt, T = the longest uncached part: row i is right-aligned, its
        P_i prompt tokens in columns W-P_i..W-1 (padding before them, masked). Columns up to W-T come
        from the row's cached prefix; a row whose cached prefix is longer than that recomputes the
        difference, which is exact. Positions count real tokens, so padding changes nothing."""
        reqs = [r for r, _ in group]
        lengths = [len(r.prompt_ids) for r in reqs]
        W = max(lengths)
        T = max(P - (hit[0] if hit else 0) for P, (_, hit) in zip(lengths, group))
        tmp = KVCache.for_model(self.model, len(reqs), W)
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        mask = torch.zeros(len(reqs), W, dtype=torch.long)
        for i, ((req, hit), P) in enumerate(zip(group, lengths)):
            mask[i, W - P :] = 1
            tail = req.prompt_ids[-T:]
            ids[i, T - len(tail) :] = torch.tensor(tail)
            cached = P - T  # > 0 only where the row has a hit of at least that many tokens
            if cached > 0:
                _, k, v, _ = hit
                tmp.k[:, i, :, W - P : W - T], tmp.v[:, i, :, W - P : W - T] = k[:, :, :cached], v[:, :, :cached]
                self.m_prefix_tokens.inc(cached)
        tmp.length = W - T
        padded = not bool(mask.all())  # read on the host, before the move
        ids, mask = ids.to(self.device), mask.to(self.device) if padded else None
        self.m_prefills.inc()
        with cpu_kernels.for_rows(len(reqs), self.device):
            h = self.model.hidden_states(ids, attention_mask=mask, kv_cache=tmp)  # (R, T, d)
            logits = self.model.full_vocab(self.model.lm_head(h[:, -1])).float()  # (R, V)
        for i, ((req, hit), P) in enumerate(zip(group, lengths)):
            self.m_prompt.inc(P)
            states = self._prompt_states(h[i, T - min(P, T) :], hit, P - T) if self.eagle else None
            self.prefixes.add(req.prompt_ids, tmp.k[:, i, :, W - P : W], tmp.v[:, i, :, W - P : W], states)
            self._active.add(req)
            row_logits = logits[i : i + 1]
            logp = row_logits.log_softmax(-1) if req.top_logprobs is not None else None
            for j in range(req.n):
                seq = _Sequence(req, j, self.tokenizer)
                seq.states = states  # (each sibling of n > 1 may end up alone)
                seq.synced = states is not None
                row = self.cache.add_row(tmp.k[:, i, :, W - P : W], tmp.v[:, i, :, W - P : W])
                assert row == len(self._rows)
                self._rows.append(seq)
                self._accept(seq, self._select(seq, row_logits), logp)
        self._free_finished()

    def _prompt_states(self, computed: torch.Tensor, hit: tuple | None, cached: int) -> torch.Tensor | None:
        """A prompt's final hidden states (P, d): those of its first `cached` tokens from the prefix
        cache, then the `computed` rest; None when the cache entry has none."""
        if cached <= 0:
            return computed.clone()  # not a view that would keep the whole burst's states alive
        if hit is None or hit[3] is None:
            return None
        return torch.cat([hit[3][:cached], computed])

    def _alone(self) -> bool:
        """Speculate: a draft, one live row, nobody waiting for a row, no logprobs wanted, and no seed (a
        seeded request's text must not depend on whether others ran beside it: rounds draw from its
        generator differently from plain steps)."""
        if self.draft is None or len(self._rows) != 1 or self._waiting:
            return False
        req = self._rows[0].req
        return req.top_logprobs is None and not (req.config.sampling and req.config.seed is not None)

    def _lone_step(self) -> None:
        """A lone row's step: a speculative round or a plain step, as the policy says; timed for it."""
        speculative = self.policy.speculate()
        seq, start = self._rows[0], time.perf_counter()
        before = seq.generated
        if speculative:
            steady = self._speculative_step()
        else:
            steady = self._decode_step()
        # not timed: a round whose draft first caught up (on a prompt, on other steps: a one-off cost), a step
        # or round that ran eagerly while its graph compiles, or beside any compile (which takes the cores and
        # the GIL: one-row steps ran many times slower beside one), neither being what that way costs later; and a
        # step that ended the request (tokens past an EOS or a stop string, a cancel, the row's freeing)
        if steady and not seq.finished and not decode.compiles_pending():
            self.policy.record(speculative, time.perf_counter() - start, seq.generated - before)

    def _speculative_step(self) -> bool:
        """One speculative round for the lone sequence: the draft proposes, the target checks all of its
        tokens in one forward over the row's cached past, and the round's tokens are accepted in order.
        True when the round was a steady one (its draft had not fallen behind)."""
        seq = self._rows[0]
        req = seq.req
        budget = req.config.max_new_tokens - seq.generated
        cache = self.cache.solo()
        if seq.spec is None:
            eos = frozenset() if req.ignore_eos else self.eos
            plain = not req.config.sampling and not seq.procs
            tree = resolve_tree(self.draft_tree, self.model, self.draft, plain)
            max_len = len(req.prompt_ids) + req.config.max_new_tokens + round_room(self.num_draft_tokens, tree) + 1
            # compiled rounds where plain steps compile: against those, eager rounds lose (docs/serve.md)
            seq.spec = Speculation(self.model, self.draft, req.config, seq.procs, seq.generator, eos, max_len,
                                   self.num_draft_tokens, self.draft_confidence, self.spec_stats,
                                   compile="auto" if self.compile else False, tree=tree)  # fmt: skip
            if seq.states is not None:  # the prompt's states from its prefill: the first round needs not rerun it
                seq.spec.add_states(seq.states)
                seq.states = None
        # (compiled rounds check num_draft_tokens + 1 columns however many were drafted: room for all; a tree's
        # check, its candidates and the newest token)
        room = (self.num_draft_tokens if self.compile else min(self.num_draft_tokens, budget)) + 1
        cache.ensure_room(max(room, len(seq.spec.tree) + 1 if seq.spec.tree is not None else 0))
        before = (self.spec_stats.proposed, self.spec_stats.accepted)
        # compiled: the row as a one-row static cache over the slot cache's own buffers (the mask column
        # static_view opens is put right by settle())
        t_cache = cache.static_view(1)[0] if self.compile else cache
        try:
            new = seq.spec.round(seq.ids, t_cache, budget)
        finally:
            cache.length = t_cache.length
            cache.settle()
        self.m_spec_rounds.inc()
        self.m_drafted.inc(self.spec_stats.proposed - before[0])
        self.m_draft_ok.inc(self.spec_stats.accepted - before[1])
        for tok in new:
            self._accept(seq, tok, None)
            if seq.finished:
                break
        seq.synced = True  # the round's checked states are pending, up to the newest token
        self._free_finished()
        spec = seq.spec
        return spec.recomputed == 0 and spec.caught_up <= spec.width and not spec.compiling

    def _decode_step(self) -> bool:
        """One forward for every live row, then each row's next token. False when the forward ran eagerly
        while its compiled graph is still to come."""
        self.cache.ensure_room(1)
        n = len(self._rows)
        bucket, graph = self._graph(n)
        final = graph is not None or not self.compile or (self._bucket(n), self.cache.capacity) in self._failed
        states = None  # a lone row's final hidden state, for its EAGLE draft
        with_states = self.eagle and n == 1 and self._rows[0].synced
        # (asked for as soon as a lone row could use it, so that it compiles beside the step's own graph, early,
        # rather than when that one is done: a compile slows every step running beside it several times over)
        rows = self._rows_graph() if with_states and self.compile else None
        # with the step compiled but not yet (or never) its rows twin: the fast step, the state left out
        with_states = with_states and (graph is None or rows is not None)
        if rows is not None:  # the step as a one-token rows graph: the same forward, its state kept
            view, mask = self.cache.static_view(1)
            h, z = rows(torch.tensor([[self._rows[0].last]], device=self.device), attention_mask=mask, kv_cache=view)
            logits, states = self.model.full_vocab(z[:, -1]).float(), h[0]
            self.cache.advance_static()
            self.m_compiled.inc()
        elif graph is not None:
            view, mask = self.cache.static_view(bucket)
            ids = [[s.last] for s in self._rows] + [[self.pad_id]] * (bucket - n)
            tokens = torch.tensor(ids, device=self.device)
            # the first call of each graph checks its guards; later ones need not (same shapes and model),
            # except while a compile runs: the stance is process-wide and would reach the compiling thread
            skip = (bucket, view.max_len) in self._checked and self._compiling is None
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
                logits = graph(tokens, attention_mask=mask, kv_cache=view, logits_to_keep=1)[:n, -1].float()
            self._checked.add((bucket, view.max_len))
            self.cache.advance_static()
            self.m_compiled.inc()
        else:
            mask = self.cache.step_mask()
            tokens = torch.tensor([[s.last] for s in self._rows], device=self.device)
            with cpu_kernels.for_rows(n, self.device):
                if with_states:
                    h = self.model.hidden_states(tokens, attention_mask=mask, kv_cache=self.cache)
                    logits, states = self.model.full_vocab(self.model.lm_head(h[:, -1])).float(), h[0]
                else:
                    logits = self.model(tokens, attention_mask=mask, kv_cache=self.cache, logits_to_keep=1)[:, -1]
                    logits = logits.float()
        for seq in self._rows if self.eagle else ():  # a row whose state was not kept: its draft recomputes it
            if states is None:
                seq.synced = False
            elif seq.spec is not None:
                seq.spec.add_states(states)
            else:
                seq.states = torch.cat([seq.states, states])
        self.m_steps.inc()
        self.m_rows.observe(len(self._rows))
        greedy = logits.argmax(-1).tolist() if any(s.plain_greedy for s in self._rows) else None
        want_lp = any(s.req.top_logprobs is not None for s in self._rows)
        logp = logits.log_softmax(-1) if want_lp else None
        for i, seq in enumerate(self._rows):
            tok = greedy[i] if seq.plain_greedy else self._select(seq, logits[i : i + 1])
            self._accept(seq, tok, logp[i : i + 1] if logp is not None else None)
        self._free_finished()
        return final

    def _rows_graph(self) -> Any:
        """The target's compiled one-token rows graph at the cache's width (final states and logits), for a
        lone row whose EAGLE draft reads every state; None while it compiles (or if it failed)."""
        warm = self._rows1.get(self.cache.capacity)
        if warm is None:  # (once per width: the key's fingerprint of the model takes ~2 ms)
            warm = self._rows1[self.cache.capacity] = decode.warmup(self.model, 1, self.cache.capacity, self.device,
                                                                    width=1)  # fmt: skip
        return warm.forward if warm.ready.is_set() and warm.failed is None else None

    def _graph(self, rows: int) -> tuple[int, Any]:
        """(bucket, its compiled decode graph at the cache's width), or (rows, None) to run eagerly,
        after asking for that graph's compile."""
        if not self.compile:
            return rows, None
        bucket = self._bucket(rows)
        key = (bucket, self.cache.capacity)
        graph = self._graphs.get(key)
        compiling = self._compiling is not None and self._compiling[0] == key
        if graph is None and key not in self._failed and key not in self._wanted and not compiling:
            self._wanted.append(key)
        return (bucket, graph) if graph is not None else (rows, None)

    def _bucket(self, rows: int) -> int:
        """The compiled graph's row count for `rows` live rows: the next power of two, or max_batch."""
        return min(self.max_batch, 1 << (rows - 1).bit_length())

    def _poll_compiles(self) -> None:
        """Collect a finished background compile and start the next one wanted (one at a time: two at
        once would share the cores with each other and with the running batch)."""
        if self._compiling is not None:
            key, warm, started = self._compiling
            if not warm.ready.is_set():
                return
            self._compiling = None
            if warm.failed is None:
                self._graphs[key] = warm.forward
                log.info(
                    "compiled the decode step for batches of %d over %d cache columns in %.1f s",
                    *key,
                    time.monotonic() - started,
                )
            else:
                self._failed.add(key)
        while self._wanted and self._compiling is None:
            key = self._wanted.pop(0)
            stale = key[1] != self.cache.capacity  # the cache has changed width since it was wanted
            if key not in self._graphs and key not in self._failed and not stale:
                self._compiling = (key, decode.warmup(self.model, *key, self.device), time.monotonic())

    def _select(self, seq: _Sequence, logits: torch.Tensor) -> int:
        """The row's processors, then a draw from its own generator (or argmax when greedy)."""
        scores = logits
        if seq.procs:
            scores = apply_processors(seq.procs, torch.tensor([seq.ids], device=logits.device), logits)
        if seq.generator is not None:
            return int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=seq.generator))
        return int(scores.argmax(-1))

    def _token_text(self, tok: int) -> tuple[str, list[int]]:
        info = self._token_info.get(tok)
        if info is None:
            raw = self.tokenizer.token_bytes(tok)
            info = self._token_info[tok] = (raw.decode("utf-8", errors="replace"), list(raw))
        return info

    def _logprob(self, seq: _Sequence, tok: int, logp: torch.Tensor) -> TokenLogprob:
        text, raw = self._token_text(tok)
        entry = TokenLogprob(text, float(logp[0, tok]), raw)
        k = seq.req.top_logprobs
        if k:
            values, idx = logp[0].topk(k)
            for t, v in zip(idx.tolist(), values.tolist()):
                t_text, t_raw = self._token_text(t)
                entry.top.append((t_text, v, t_raw))
        return entry

    def _accept(self, seq: _Sequence, tok: int, logp: torch.Tensor | None) -> None:
        """Record a chosen token and send whatever text it completes."""
        req = seq.req
        if req.cancelled:
            seq.finished = True
            return
        seq.ids.append(tok)
        seq.generated += 1
        req.completion_tokens += 1
        self.m_generated.inc()
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.m_ttft.observe(req.first_token_at - req.submitted)
        if logp is not None:
            seq.pending.append(self._logprob(seq, tok, logp))
        if tok in self.eos and not req.ignore_eos:
            return self._finish(seq, "stop")
        before = len(seq.decoder.text)
        seq.decoder.push(tok)
        if seq.stops.stops and seq.stops.find(seq.decoder.text, before) is not None:
            return self._finish(seq, "stop")
        if seq.generated >= req.config.max_new_tokens:
            return self._finish(seq, "length")
        safe = seq.stops.safe_end(seq.decoder.text) if seq.stops.stops else len(seq.decoder.text)
        if safe > seq.shown or seq.pending:
            self._emit(req, Delta(seq.index, seq.decoder.text[seq.shown : safe], seq.pending))
            seq.shown, seq.pending = max(seq.shown, safe), []

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """Flush the text (cut before any stop string), send the last delta, and the request's end."""
        dec = seq.decoder
        dec.flush()
        at = seq.stops.find(dec.text, seq.shown) if seq.stops.stops else None
        if at is not None:
            reason = "stop"
        end = at if at is not None else len(dec.text)
        self._emit(seq.req, Delta(seq.index, dec.text[seq.shown : end], seq.pending, reason))
        seq.shown, seq.pending, seq.finished = end, [], True
        seq.req.unfinished -= 1
        if seq.req.unfinished == 0:
            self._completed.append(seq.req)  # Done goes out once the rows are free, so counts never lag it

    def _free_finished(self) -> None:
        """Give back the rows of finished sequences; a request leaves when all its rows have."""
        # descending order: remove_row moves the last row into the freed one, which must not be pending
        for i in range(len(self._rows) - 1, -1, -1):
            seq = self._rows[i]
            if not seq.finished:
                continue
            self._keep_conversation(i, seq)
            self.cache.remove_row(i)
            last = self._rows.pop()
            if i < len(self._rows):
                self._rows[i] = last
            if seq.req.cancelled or seq.req.unfinished == 0:
                self._active.discard(seq.req)
        completed, self._completed = self._completed, []
        for req in completed:
            self._emit(req, Done(len(req.prompt_ids), req.completion_tokens))

    def _keep_conversation(self, row: int, seq: _Sequence) -> None:
        """A finished sequence's keys/values (its prompt and every token fed back: all but the last) into
        the prefix cache, as llama.cpp's server keeps a slot's: a chat's next request is this
        conversation and a new turn, and then prefills only the new turn (and the template's tokens
        around it). Not for a cancelled request, nor where the row does not hold exactly those tokens."""
        if self.prefixes.max_tokens <= 0 or seq.req.cancelled or seq.generated == 0:
            return
        n = len(seq.ids) - 1
        if self.cache.length - self.cache.start[row] != n or n > self.prefixes.max_tokens:
            return
        k, v = self.cache.row_kv(row)  # (copies already)
        self.prefixes.add(seq.ids[:-1], k, v, copy=False)

    def _fail_running(self, message: str) -> None:
        for req in list(self._active):
            if not req.cancelled:
                self._emit(req, Failed(message, 500, "server_error"))
            req.cancelled = True
        for seq in self._rows:
            seq.finished = True
        try:
            self._free_finished()
        except Exception:  # the cache itself is broken: start a fresh one
            self._rows = []
            self.cache = self._new_cache()
        self._active.clear()

    def _new_cache(self) -> SlotKVCache:
        return SlotKVCache.for_model(self.model, self.max_batch, self.context, self.cache_columns)
