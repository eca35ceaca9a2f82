"""The scheduler without HTTP: batching changes nothing, whatever the arrival order and cache housekeeping."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.utils import counters

import lmlab
from lmlab.generate import GenerationConfig
from lmlab.generate.decode import wait_for_compiles
from lmlab.serve.batch_cache import SlotKVCache
from lmlab.serve.engine import Delta, Done, Engine, Failed, Request


class Collector:
    """Gathers a request's events the way the HTTP layer would."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.reasons: dict[int, str] = {}
        self.done = threading.Event()
        self.failed: Failed | None = None
        self.usage: Done | None = None
        self.on_delta = None  # called with each Delta, in the scheduler thread

    def __call__(self, ev) -> None:
        if isinstance(ev, Delta):
            self.texts[ev.index] = self.texts.get(ev.index, "") + ev.text
            if ev.finish_reason:
                self.reasons[ev.index] = ev.finish_reason
            if self.on_delta:
                self.on_delta(ev)
        elif isinstance(ev, Done):
            self.usage = ev
            self.done.set()
        else:
            self.failed = ev
            self.done.set()


def _prompts(tok, n: int) -> list[list[int]]:
    # different lengths, from a few tokens to several hundred, so rows start at different columns
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "judge",
        "boxing",
        "matches",
    ]
    out = []
    for i in range(n):
        k = [3, 40, 9, 250, 17, 1, 120, 5, 60, 33, 2, 300, 11, 75, 7, 150][i % 16]
        text = " ".join(words[(i + j) % len(words)] for j in range(k))
        out.append(tok.encode(text)[: max(1, k)])
    return out


def _staggered(engine: Engine, prompts: list[list[int]], max_new: list[int]) -> list[Collector]:
    """Run greedy requests that arrive while others run: request i+1 is submitted from inside the
    scheduler once request i has produced 3 pieces of text. Returns their collectors, all done."""
    cols = [Collector() for _ in prompts]
    reqs = [
        Request(p, GenerationConfig(max_new_tokens=m), c, ignore_eos=True) for p, m, c in zip(prompts, max_new, cols)
    ]
    for i in range(len(reqs) - 1):
        seen = [0]

        def chain(ev, i=i, seen=seen):
            seen[0] += 1
            if seen[0] == 3:
                engine.submit(reqs[i + 1])

        cols[i].on_delta = chain
    engine.submit(reqs[0])
    for c in cols:
        assert c.done.wait(120), "a request never finished"
    return cols


def test_staggered_arrivals_match_generate(tiny):
    """Requests join while others run (long prompts shift the cache, finished rows leave, the cache grows and
    compacts); every greedy answer equals lmlab.generate on its own."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=6, max_queue=64, cache_columns=32).start()
    try:
        prompts = _prompts(tok, 16)
        max_new = [40, 7, 90, 25, 130, 12, 60, 33, 5, 80, 48, 20, 100, 9, 66, 30]
        cols = _staggered(engine, prompts, max_new)
        cache = engine.cache
        assert cache.shifts > 0 and cache.compactions > 0 and cache.grows > 0  # every housekeeping path ran
        assert engine.running_requests == 0 and cache.rows == 0 and engine.kv_used_tokens() == 0
        for p, m, c in zip(prompts, max_new, cols):
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=m, stop_token_ids=[]))[0]
            assert c.failed is None
            assert c.texts[0] == ref.text
            assert c.usage.completion_tokens == m and c.usage.prompt_tokens == len(p)
    finally:
        engine.close()


def test_a_burst_is_prefilled_together_and_matches_generate(tiny):
    """Requests that arrive together share prefill forwards (left-padded, grouped by length), and each
    greedy answer still equals lmlab.generate on its own."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8, max_queue=64)
    prompts = _prompts(tok, 8)
    cols = [Collector() for _ in prompts]
    for p, c in zip(prompts, cols):  # queued before the scheduler runs: one burst
        engine.submit(Request(p, GenerationConfig(max_new_tokens=20), c, ignore_eos=True))
    engine.start()
    try:
        for c in cols:
            assert c.done.wait(120), "a request never finished"
        forwards = engine.m_prefills.value()
        assert 1 <= forwards < len(prompts)  # batched: fewer forwards than prompts
        for p, c in zip(prompts, cols):
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=20, stop_token_ids=[]))[0]
            assert c.failed is None and c.texts[0] == ref.text
    finally:
        engine.close()
        wait_for_compiles()  # a compile thread alive at exit would abort the interpreter


def test_an_idle_engine_lets_a_burst_gather_into_one_prefill(tiny):
    """Requests reaching an idle engine a few milliseconds apart (as 16 HTTP clients' do) share one
    prefill forward; with gather_ms=0 the first is prefilled alone as soon as it comes."""
    import time

    model, tok = tiny
    prompts = [tok.encode(t) for t in ("the quick brown fox", "seven wizards", "judge boxing matches today", "dog")]
    for gather_ms, forwards in ((500.0, 1), (0.0, None)):
        engine = Engine(model, tok, max_batch=8, prefix_cache_tokens=0, gather_ms=gather_ms).start()
        try:
            cols = [Collector() for _ in prompts]
            for p, c in zip(prompts, cols):
                engine.submit(Request(p, GenerationConfig(max_new_tokens=4), c, ignore_eos=True))
                time.sleep(0.05)
            for p, c in zip(prompts, cols):
                assert c.done.wait(120) and c.failed is None
                ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=4, stop_token_ids=[]))[0]
                assert c.texts[0] == ref.text
            if forwards is not None:
                assert engine.m_prefills.value() == forwards
            else:
                assert engine.m_prefills.value() > 1
        finally:
            engine.close()


def test_a_failed_prefill_fails_its_requests_instead_of_losing_them(tiny, monkeypatch):
    """A prefill that raises (out of memory, say): every request of the burst gets a 500 Failed event
    (none is left waiting forever), and the engine goes on serving the next one."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4)
    real = Engine._prefill
    calls = []

    def broken(self, group):
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(self, group)

    monkeypatch.setattr(Engine, "_prefill", broken)
    cols = [Collector() for _ in range(3)]
    for i, c in enumerate(cols):  # queued before the scheduler runs: one burst, one failed forward
        engine.submit(Request(tok.encode(f"request number {i}"), GenerationConfig(max_new_tokens=3), c))
    engine.start()
    try:
        for c in cols:
            assert c.done.wait(60) and c.failed is not None and c.failed.status == 500
        after = Collector()
        engine.submit(Request(tok.encode("and one more"), GenerationConfig(max_new_tokens=3), after, ignore_eos=True))
        assert after.done.wait(60) and after.failed is None and after.usage.completion_tokens == 3
    finally:
        engine.close()


def test_n_choices_seeds_stops_and_penalties(tiny):
    """n rows share one prefill; choice j samples with seed + j; stop strings cut the text; penalties apply per row."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8).start()
    try:
        prompt = tok.encode("Once upon a time")
        col = Collector()
        cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, num_return_sequences=3, seed=5)
        engine.submit(Request(prompt, cfg, col))
        assert col.done.wait(60)
        for j in range(3):
            ref = lmlab.generate(model, tok, prompt, cfg.replace(num_return_sequences=1, seed=5 + j))[0]
            assert col.texts[j] == ref.text
        assert col.usage.completion_tokens == sum(
            len(lmlab.generate(model, tok, prompt, cfg.replace(num_return_sequences=1, seed=5 + j))[0].token_ids)
            for j in range(3)
        )

        full = lmlab.generate(model, tok, prompt, max_new_tokens=12)[0].text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        col = Collector()
        engine.submit(Request(prompt, GenerationConfig(max_new_tokens=12, stop=[stop]), col))
        assert col.done.wait(60)
        assert col.texts[0] == full[: full.index(stop)] and col.reasons[0] == "stop"

        cfg = GenerationConfig(max_new_tokens=16, presence_penalty=1.5, frequency_penalty=1.0)
        col = Collector()
        engine.submit(Request(prompt, cfg, col))
        assert col.done.wait(60)
        assert col.texts[0] == lmlab.generate(model, tok, prompt, cfg)[0].text
    finally:
        engine.close()


def test_timeout_and_cancel_free_rows(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2).start()
    try:
        col = Collector()
        engine.submit(
            Request(tok.encode("hello"), GenerationConfig(max_new_tokens=900), col, ignore_eos=True, timeout=0.05)
        )
        assert col.done.wait(60)
        assert col.failed is not None and col.failed.status == 504

        col = Collector()
        started = threading.Event()
        col.on_delta = lambda ev: started.set()
        req = engine.submit(Request(tok.encode("hello"), GenerationConfig(max_new_tokens=900), col, ignore_eos=True))
        assert started.wait(60)
        engine.cancel(req)
        # a cancelled request's rows are freed at the next step; the next request then runs alone
        after = Collector()
        engine.submit(Request(tok.encode("hi"), GenerationConfig(max_new_tokens=3), after))
        assert after.done.wait(60)
        assert not col.done.is_set() or col.failed is None
        assert engine.running_requests == 0 and engine.cache.rows == 0
    finally:
        engine.close()


@torch.inference_mode()  # as the engine uses it: its buffers are inference tensors
def test_slot_cache_layout():
    """Rows are right-aligned at the shared column; shifting, compacting and removing keep each row's K/V."""
    cache = SlotKVCache(n_layer=1, max_rows=3, n_kv_head=1, head_dim=1, max_len=16, dtype=torch.float32, initial_len=4)

    def kv(values):
        t = torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1)
        return t, -t

    def row(i):
        L, s = cache.length, cache.start[i]
        assert cache.mask[i, :s].sum() == 0 and bool(cache.mask[i, s:L].all())
        return cache.k[0][i, 0, s:L, 0].tolist()

    cache.add_row(*kv([1, 2]))
    assert cache.length == 2 and row(0) == [1, 2]
    cache.add_row(*kv([5, 6, 7, 8, 9]))  # longer than the columns in use: row 0 shifts right (and the buffer grows)
    assert cache.length == 5 and row(0) == [1, 2] and row(1) == [5, 6, 7, 8, 9] and cache.start[0] == 3
    assert cache.grows == 1 and cache.shifts == 1
    cache.add_row(*kv([3]))
    assert row(2) == [3]
    for step in range(2):  # a decode step writes one column for every row
        cache.ensure_room(1)
        cache.step_mask()
        k = torch.full((3, 1, 1, 1), 10.0 + step)
        cache.update(0, k, -k)
    assert row(0) == [1, 2, 10, 11] and row(1) == [5, 6, 7, 8, 9, 10, 11] and row(2) == [3, 10, 11]
    cache.remove_row(1)  # the long row leaves: the last row moves into its slot; a dead prefix remains
    assert cache.rows == 2 and row(0) == [1, 2, 10, 11] and row(1) == [3, 10, 11]
    cache.ensure_room(1)
    cache.step_mask()
    k = torch.full((2, 1, 1, 1), 12.0)
    cache.update(0, k, -k)
    assert cache.length == cache.capacity == 8 and cache.compactions == 0
    cache.ensure_room(1)  # the buffer is full but every row has a dead prefix: compacted, not grown
    assert cache.compactions == 1 and cache.grows == 1 and cache.length == 5
    assert row(0) == [1, 2, 10, 11, 12] and row(1) == [3, 10, 11, 12]
    assert cache.used_tokens() == 9
    cache.remove_row(0)
    cache.remove_row(0)
    assert cache.rows == 0 and cache.length == 0 and cache.capacity == 4


@pytest.mark.parametrize("bad", [{"num_return_sequences": 9}])
def test_n_beyond_the_batch_is_refused(tiny, bad):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8)
    with pytest.raises(lmlab.LmlabError, match="n must be"):
        engine.submit(Request([1, 2], GenerationConfig(**bad), lambda ev: None))


def test_serve_forever_runs_the_scheduler_in_the_calling_thread_until_closed(tiny):
    """`lmlab serve` runs the scheduler in its main thread (OpenMP is fastest there) and HTTP beside it:
    requests submitted from another thread are answered as by start(), and close() ends the loop."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4)
    prompt = tok.encode("the quick brown fox")
    col, seen = Collector(), {}

    def client():
        engine.submit(Request(prompt, GenerationConfig(max_new_tokens=6), col, ignore_eos=True))
        seen["done"] = col.done.wait(60)
        engine.close()

    threading.Thread(target=client).start()
    engine.serve_forever()  # returns once the client closes the engine
    ref = lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=6, stop_token_ids=[]))[0]
    assert seen["done"] and col.failed is None and col.texts[0] == ref.text


def test_compiled_steps_match_generate(tiny):
    """With `compile`, decode steps run as compiled graphs over batch-size buckets (live rows plus
    padding rows) while requests come and go and the cache shifts, compacts and grows; every greedy
    answer still equals lmlab.generate on its own, and every step was a compiled one."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=3, max_queue=64, cache_columns=32, compile=True)
    engine.precompile(columns=[32, 64, 128])
    assert sorted(engine._graphs) == [(b, w) for b in (1, 2, 3) for w in (32, 64, 128)]
    graphs = counters["stats"]["unique_graphs"]
    engine.start()
    try:
        prompts = [p[:24] for p in _prompts(tok, 6)]  # widths up to 128 columns
        max_new = [30, 7, 40, 25, 12, 20]
        cols = _staggered(engine, prompts, max_new)
        cache = engine.cache
        assert cache.shifts > 0 and cache.compactions > 0 and cache.grows > 0
        assert engine.m_compiled.value() == engine.m_steps.value() > 0  # no step ran eagerly
        assert counters["stats"]["unique_graphs"] == graphs  # the cache's views fit the graphs: no recompile
        for p, m, c in zip(prompts, max_new, cols):
            ref = lmlab.generate(model, tok, p, GenerationConfig(max_new_tokens=m, stop_token_ids=[]))[0]
            assert c.failed is None and c.texts[0] == ref.text
    finally:
        engine.close()
        wait_for_compiles()  # a compile thread alive at exit would abort the interpreter


def test_graphs_compile_in_the_background_while_eager_steps_serve(tiny):
    """Without precompile, the first request runs eagerly while its graph compiles in the background;
    the next request, once it is ready, runs compiled, and both answers equal generate's."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, cache_columns=64, compile=True).start()
    try:
        prompt = _prompts(tok, 1)[0]
        ref = lmlab.generate(model, tok, prompt, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))[0]
        for _ in range(2):
            col = Collector()
            engine.submit(Request(prompt, GenerationConfig(max_new_tokens=12), col, ignore_eos=True))
            assert col.done.wait(120) and col.failed is None and col.texts[0] == ref.text
            compiling = engine._compiling
            if compiling is not None:
                assert compiling[1].ready.wait(300)  # the graph for one row at 64 columns
        assert engine.m_compiled.value() >= 11  # the second request's steps
    finally:
        engine.close()
        wait_for_compiles()
