"""A chat of several turns with the conversation's keys/values kept between answers (what `lmlab chat`
does: `ChatSession.past`) and without (each turn prefills the whole conversation again), side by side
in one process, turn by turn: time to the first piece of each answer and to its last, and the tokens
each turn ran through its prefill. The answers must be the same both ways.

Compile "auto" as the chat runs; the graphs are built before each timed answer (`wait_for_compiles`),
so both ways time compiled steps and only the prefill differs.

With --server the same chat goes to a serving `Engine` (in this process, its scheduler in a thread of
its own) as a chat page's requests do, each the whole conversation: the engine keeps each finished
answer's keys/values in its prefix cache, against the same engine keeping only prompts' (what it did
before; `_keep_conversation` switched off), two engines one after the other. Time to first token is
the engine's own (`Request.first_token_at`).

    PYTHONPATH=src .venv/bin/python benchmarks/chat_turns.py [--model smollm2-135m-instruct] [--new-tokens 128]
    PYTHONPATH=src .venv/bin/python benchmarks/chat_turns.py --server
    PYTHONPATH=src .venv/bin/python benchmarks/chat_turns.py --fp32 --draft out/compress/eagle-int4 --new-tokens 96

With --draft every answer is speculative, and the draft's state is kept between turns with the
target's keys/values (`PromptCache.draft`): acceptance both ways. With --draft --restart-draft the
second way keeps the target's keys/values too but drops the draft's state before each turn, so an
EAGLE draft starts over on the last 32 kept tokens (what a chat did before the state was kept):

    PYTHONPATH=src .venv/bin/python benchmarks/chat_turns.py --fp32 --draft out/compress/eagle-int4 --new-tokens 96 --restart-draft
"""

from __future__ import annotations

import argparse
import time

from chat_widths import QUESTIONS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--server", action="store_true", help="through a serving Engine's prefix cache")
    ap.add_argument("--draft", default=None, help="every answer speculative with this draft; prints acceptance")
    ap.add_argument("--fp32", action="store_true", help="float32 weights (default: GGUF blocks, as the chat loads)")
    ap.add_argument("--restart-draft", action="store_true",
                    help="--draft: the second way keeps the target's cache but not the draft's state")  # fmt: skip
    args = ap.parse_args()
    if args.server:
        return server(args)

    from lmlab.generate import GenerationConfig, decode
    from lmlab.generate.chat import ChatSession
    from lmlab.generate.speculative import load_draft
    from lmlab.model.checkpoint import load_pretrained

    model, tok = load_pretrained(args.model, dequantize=True if args.fp32 else "auto")  # "auto": as `lmlab chat`
    draft = load_draft(args.draft, model) if args.draft else None
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, compile="auto")
    kept, fresh = (ChatSession(model, tok, cfg, draft=draft, speculate="always") for _ in range(2))
    restart = bool(args.restart_draft and draft is not None)
    if not restart:
        fresh.past = None
    second = "restarted" if restart else "fresh"  # what the second way is called in the table
    drafted = {"kept": [0, 0], "second": [0, 0]}  # accepted, proposed
    owner = decode.prompt_cache_owner(model)

    def answer(session: ChatSession, q: str) -> tuple[str, float, float, int]:
        if restart and session is fresh:
            session.past.draft = None  # the target's keys/values kept, the draft starting over
        session.precompile()
        decode.wait_for_compiles()
        ids = tok.encode(session.prompt([*session.messages, {"role": "user", "content": q}]))
        prefill = len(ids) - (session.past.reusable(ids, owner) if session.past is not None else 0)
        t = time.perf_counter()
        first, pieces = None, []
        for piece in session.reply(q):
            first = first or time.perf_counter() - t
            pieces.append(piece)
        return "".join(pieces), first or 0.0, time.perf_counter() - t, prefill

    print(f"{args.model}, {args.new_tokens} new tokens per answer, compiled steps; kept = keys/values kept between "
          + ("turns, restarted = the same with the draft's state dropped before each turn" if restart
             else "turns, fresh = the whole conversation prefilled each turn"))  # fmt: skip
    print(f"{'turn':>4} {'prompt':>6} {'prefilled kept/' + second:>21} {'first piece s kept/' + second:>25} "
          f"{'answer s kept/' + second:>20} {'answer':>7}")  # fmt: skip
    totals = [0.0, 0.0, 0.0, 0.0]
    for i, q in enumerate(QUESTIONS):
        prompt = len(tok.encode(kept.prompt([*kept.messages, {"role": "user", "content": q}])))
        a_kept, f_kept, s_kept, n_kept = answer(kept, q)
        a_fresh, f_fresh, s_fresh, n_fresh = answer(fresh, q)
        if a_kept != a_fresh:
            raise SystemExit(f"turn {i + 1}: the answers differ:\n{a_kept!r}\n{a_fresh!r}")
        for name, session in (("kept", kept), ("second", fresh)):
            if session.stats is not None:
                drafted[name][0] += session.stats.accepted
                drafted[name][1] += session.stats.proposed
        for j, v in enumerate((f_kept, f_fresh, s_kept, s_fresh)):
            totals[j] += v
        print(f"{i + 1:>4} {prompt:>6} {n_kept:>10}/{n_fresh:<10} {f_kept:>12.3f}/{f_fresh:<12.3f} "
              f"{s_kept:>9.2f}/{s_fresh:<10.2f} {len(tok.encode(a_kept, add_special_tokens=False)):>7}")  # fmt: skip
    print(f"all turns: first pieces {totals[0]:.2f} s kept / {totals[1]:.2f} s {second} ({totals[1] / totals[0]:.1f}x); "
          f"answers {totals[2]:.1f} s / {totals[3]:.1f} s ({totals[3] / totals[2]:.2f}x); answers identical")  # fmt: skip
    if draft is not None:
        print("drafted tokens accepted: " + ", ".join(f"{a}/{p} {k if k == 'kept' else second}"
                                                      for k, (a, p) in drafted.items()))  # fmt: skip
    return 0


def server(args: argparse.Namespace) -> int:
    import threading

    from lmlab.generate import GenerationConfig
    from lmlab.model.checkpoint import load_pretrained
    from lmlab.serve.engine import Delta, Engine, Request

    model, tok = load_pretrained(args.model, dequantize="auto")  # as `lmlab serve` loads it
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    runs: dict[str, list[tuple]] = {}
    for way in ("prompts only", "answers kept"):
        engine = Engine(model, tok)  # eager steps: the prefill, which is what differs, is eager either way
        if way == "prompts only":
            engine._keep_conversation = lambda row, seq: None
        engine.start()
        messages: list[dict[str, str]] = []
        runs[way] = []
        try:
            for q in QUESTIONS:
                messages.append({"role": "user", "content": q})
                ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
                text, done = [], threading.Event()

                def on_event(ev, text=text, done=done):
                    if isinstance(ev, Delta):
                        text.append(ev.text)
                    else:
                        done.set()

                reused = engine.m_prefix_tokens.value()
                req = Request(ids, cfg, on_event)
                engine.submit(req)
                done.wait()
                answer = "".join(text)
                runs[way].append((len(ids), int(engine.m_prefix_tokens.value() - reused),
                                  req.first_token_at - req.submitted, answer))  # fmt: skip
                messages.append({"role": "assistant", "content": answer})
        finally:
            engine.close()
    a, b = runs["prompts only"], runs["answers kept"]
    print(f"{args.model}, {args.new_tokens} new tokens per answer, serving Engine (eager steps, scheduler thread)")
    print(f"{'turn':>4} {'prompt':>6} {'reused kept/prompts only':>25} {'first token s kept/prompts only':>32}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x[3] != y[3]:
            raise SystemExit(f"turn {i + 1}: the answers differ")
        print(f"{i + 1:>4} {y[0]:>6} {y[1]:>12}/{x[1]:<12} {y[2]:>15.3f}/{x[2]:<16.3f}")
    ta, tb = sum(x[2] for x in a), sum(y[2] for y in b)
    print(f"all turns: first tokens {tb:.2f} s kept / {ta:.2f} s prompts only ({ta / tb:.1f}x); answers identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
