"""The chat REPL, --explain and the generate command, on SmolLM2 and a tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lmlab
from lmlab.generate import GenerationConfig
from lmlab.generate.chat import ChatSession, repl
from lmlab.generate.explain import explain, plot_explanation


@pytest.fixture(scope="module")
def smol():
    return lmlab.load_pretrained("smollm2-135m-instruct")


def test_repl_commands_and_history(smol):
    model, tok = smol
    session = ChatSession(model, tok, GenerationConfig(max_new_tokens=8), system="Answer briefly.")
    commands = ["Hi!", "/set temperature 0.5", "/set top_p 7", "/system Be a pirate.", "Hello"]
    commands += ["/set compile maybe", "/set compile on", "/reset", "/quit"]
    lines = iter(commands)
    shown = []
    repl(session, read=lambda _: next(lines), write=shown.append)
    text = "".join(shown)
    assert "(temperature = 0.5)" in text
    assert "error: top_p: 7.0 must be in (0, 1]" in text
    assert "(system prompt: 'Be a pirate.'" in text
    assert session.messages == [] and session.system == "Be a pirate."
    assert session.config.temperature == 0.5
    assert "error: compile: 'maybe' is not true or false" in text
    assert session.config.compile is True


def test_chat_turns_enter_the_template(smol):
    model, tok = smol
    session = ChatSession(model, tok, GenerationConfig(max_new_tokens=6))
    answer = "".join(session.reply("What is 2+2?"))
    assert session.messages[-1] == {"role": "assistant", "content": answer}
    prompt = session.prompt()
    assert prompt.count("<|im_start|>user") == 1 and answer in prompt


def test_a_chat_turn_runs_only_its_new_tokens_and_answers_as_from_scratch(smol):
    """The chat keeps its conversation's keys/values: after the first turn a turn's prefill is its
    question and the template's few tokens around it (the answer's text, encoded again in the template,
    is the tokens generated for it), and each answer is the one a chat that prefills everything gives,
    also after /system and /reset change how the conversation begins."""
    model, tok = smol
    cfg = GenerationConfig(max_new_tokens=24)
    kept, fresh = ChatSession(model, tok, cfg), ChatSession(model, tok, cfg)
    fresh.past = None
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    try:
        for turn, q in enumerate(["What is the capital of France?", "And of Italy?", "Name a river there.",
                                  "/system You answer in one word.", "And of Spain?"]):  # fmt: skip
            if q.startswith("/system"):
                for s in (kept, fresh):
                    s.system = q.split(" ", 1)[1]
                    s.reset()
                continue
            prompt = tok.encode(kept.prompt([*kept.messages, {"role": "user", "content": q}]))
            calls.clear()
            answer = "".join(kept.reply(q))
            assert answer == "".join(fresh.reply(q)), turn
            question = len(tok.encode(q, add_special_tokens=False))
            if turn in (1, 2):
                # the answer's last token (never fed back), "<|im_end|>\n<|im_start|>user\n" (5), the question,
                # "<|im_end|>\n<|im_start|>assistant\n" (5)
                assert calls[0] <= question + 11, (turn, calls[0], question)
            else:  # the first turn; a new system prompt: all of it (the default one's first tokens differ)
                assert calls[0] >= len(prompt) - 8, (turn, calls[0], len(prompt))
    finally:
        hook.remove()


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_exchanges(smol):
    """A random model with SmolLM2's tokenizer and a 160-token context: each turn's prompt and answer
    fit it, the oldest question-and-answer pairs going first (the REPL says so), the system prompt
    and the newest question staying; a question that cannot fit alone is refused and not kept."""
    from lmlab.errors import LmlabError

    _, tok = smol
    torch.manual_seed(0)
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", vocab_size=49152, max_seq_len=160, eos_token_id=None)
    model = lmlab.Transformer(cfg).eval()
    session = ChatSession(model, tok, GenerationConfig(max_new_tokens=60), system="Be brief.")
    lens, drops = [], []
    real = model.forward

    def forward(ids, *a, kv_cache=None, **k):  # every token a call sees: the cached ones and its own
        lens.append(kv_cache.length + ids.shape[1] if kv_cache is not None else ids.shape[1])
        return real(ids, *a, kv_cache=kv_cache, **k)

    model.forward = forward
    for i in range(6):
        "".join(session.reply(f"Question number {i}: what comes next?"))
        drops.append(session.dropped)
        assert session.messages[0]["content"].startswith("Question number") and len(session.messages) % 2 == 0
        assert session.messages[-2]["content"] == f"Question number {i}: what comes next?"
    assert max(lens) <= 160 and sum(drops) > 0 and drops[0] == 0
    assert "Be brief." in session.prompt()
    # an answer that never came (a stream abandoned) leaves two questions in a row: dropping then must
    # not take the newest question with the old one
    session.reset()
    session.messages.append({"role": "user", "content": "An abandoned question about numbers. " * 14})
    "".join(session.reply("The newest question: what about the number 100?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.dropped == 1
    assert session.messages[0]["content"] == "The newest question: what about the number 100?"
    written = []
    lines = iter(["One more question, please?", "/quit"])
    repl(session, read=lambda _: next(lines), write=written.append)
    assert any("oldest messages were dropped" in w for w in written) == (session.dropped > 0)
    before = list(session.messages)
    with pytest.raises(LmlabError, match="exceed the model's context of 160"):
        session.reply("word " * 200)
    assert session.messages == before


def test_chat_with_a_draft_streams_the_same_answers(smol):
    """Speculative decoding in a chat: each turn streams exactly what the chat without a draft does,
    stop strings cut alike; a draft with another vocabulary is refused when the session opens."""
    from lmlab.errors import LmlabError
    from lmlab.generate.decode import stream
    from lmlab.generate.speculative import SpeculativeStats, speculative_stream, truncated_draft

    model, tok = smol
    cfg = GenerationConfig(max_new_tokens=24)
    draft = truncated_draft(model, 6)
    plain, fast = ChatSession(model, tok, cfg), ChatSession(model, tok, cfg, draft=draft, num_draft_tokens=3)
    ways, costs = [], []
    for question in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
        costs.append(dict(fast.policy.cost))
        answer = "".join(fast.reply(question))
        assert answer and answer == "".join(plain.reply(question))
        ways.append(fast.stats is not None)
    assert fast.messages == plain.messages and len(fast.messages) == 6
    # by default an answer is speculative while that measures faster: the first one is, the second is
    # plain (both measured), the third whichever was faster per character
    assert ways[:2] == [True, False] and ways[2] == (costs[2][True] <= costs[2][False])
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 9."}], add_generation_prompt=True)
    full = "".join(stream(model, tok, prompt, cfg))
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a stop string in the middle of the answer
    stats = SpeculativeStats()
    got = "".join(speculative_stream(model, draft, tok, prompt, cfg.replace(stop=[stop]), 3, stats=stats))
    assert got == "".join(stream(model, tok, prompt, cfg.replace(stop=[stop]))) == full[: full.index(stop)]
    assert stats.rounds > 0 and stats.generated >= len(tok.encode(got, add_special_tokens=False)) - 1
    torch.manual_seed(0)
    other = lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny")).eval()
    with pytest.raises(LmlabError, match="vocabulary"):
        ChatSession(model, tok, cfg, draft=other)
    with pytest.raises(LmlabError, match="one sequence"):
        next(speculative_stream(model, draft, tok, prompt, cfg.replace(num_beams=2)))


def test_chat_answers_decoded_while_graphs_compile_are_not_timed(smol, monkeypatch):
    """With compile "auto", answers that ran (partly) eagerly while a graph compiles do not count for the
    policy (their speed is not what either way costs once compiled): it records nothing and keeps
    measuring, speculatively, and the answers stay the plain chat's."""
    import threading

    from lmlab.generate import decode
    from lmlab.generate.speculative import truncated_draft

    class Pending:  # a compile that never finishes
        ready, failed = threading.Event(), None

    monkeypatch.setattr(decode, "warmup", lambda *a, **k: Pending)
    monkeypatch.setattr(decode, "compiles_pending", lambda: 1)
    model, tok = smol
    cfg = GenerationConfig(max_new_tokens=8, compile="auto")
    plain = ChatSession(model, tok, cfg)
    fast = ChatSession(model, tok, cfg, draft=truncated_draft(model, 6), num_draft_tokens=3)
    for question in ("What is the capital of France?", "And of Italy?"):
        assert "".join(fast.reply(question)) == "".join(plain.reply(question))
        assert fast.stats is not None  # still measuring: speculative first
    assert fast.policy.seen == {True: 0, False: 0}


def test_chat_compiles_the_next_answers_graphs_while_the_user_types(smol, monkeypatch, pending_warmups):
    """With compile "auto", the REPL starts the background compiles of the graphs the next answer runs
    before it reads the question: every graph an answer to a short question asks for, plain or
    speculative, was asked for before its question was read, also when the conversation outgrows a
    graph width (here 64 -> 128 -> 256 columns). The compiles never finish here: answers run eagerly."""
    from lmlab.generate.speculative import truncated_draft

    events = pending_warmups
    model, tok = smol
    cfg = GenerationConfig(max_new_tokens=8, compile="auto")
    questions = ["What is the capital of France?", "And of Italy?", "And of Spain?", "Of Peru?", "Chile?", "Japan?"]
    for draft in (None, truncated_draft(model, 6)):
        session = ChatSession(model, tok, cfg, draft=draft, num_draft_tokens=3)
        events.clear()
        lines = iter([*questions, "/quit"])
        real = session.precompile

        def precompile(real=real):
            events.append("precompile")
            real()

        def read(_, lines=lines):
            events.append("read")
            return next(lines)

        monkeypatch.setattr(session, "precompile", precompile)
        repl(session, read=read, write=lambda s: None)
        reads = [i for i, e in enumerate(events) if e == "read"]
        assert len(reads) == len(questions) + 1
        for r in reads[:-1]:  # each answer's lookups: from its read to the next precompile
            end = events.index("precompile", r)
            asked = set(events[r + 1 : end])
            assert asked and asked <= set(events[:r]), (events[r - 1 :], asked - set(events[:r]))
        widths = {e[2] for e in events if isinstance(e, tuple)}
        assert {64, 128, 256} <= widths, widths
        assert (draft is not None) == any(e[3] for e in events if isinstance(e, tuple))


def test_explain_stages_reshape_as_defined(smol, tmp_path):
    model, tok = smol
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
    cfg = GenerationConfig(temperature=0.5, top_k=3, top_p=0.9, seed=0)
    steps = explain(model, tok, prompt, cfg, steps=2, k=6)
    for s in steps:
        raw, temp, k3, p9 = (s.stages[n] for n in s.stages)
        assert raw == sorted(raw, reverse=True)
        assert temp[0] > raw[0]  # T < 1 sharpens
        assert all(p == 0 for p in k3[3:]) and sum(k3[:3]) == pytest.approx(1.0, abs=1e-4)
        assert p9[0] >= k3[0]
    png = plot_explanation(steps, tmp_path / "explain.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_command_streams_the_same_text_as_the_library(smol, tmp_path):
    model, tok = smol
    want = lmlab.generate(model, tok, "The capital of France is", max_new_tokens=12)[0].text
    r = _cli(
        "generate", "--model", "smollm2-135m-instruct", "--prompt", "The capital of France is", "--max-new-tokens", "12"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    bad = _cli("generate", "--model", "smollm2-135m-instruct", "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_command_with_a_draft_prints_what_it_prints_without(tmp_path):
    """`lmlab chat --draft :6` (greedy) shows the same conversation as `lmlab chat`; a bad :N is one line."""
    args = ["chat", "--model", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "16"]
    turns = "What is the capital of France?\nAnd of Italy?\n/quit\n"

    def chat(*extra):
        return subprocess.run([sys.executable, "-m", "lmlab.cli", *args, *extra], input=turns, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    plain, fast = chat(), chat("--draft", ":6", "--num-draft-tokens", "3", "--speculate", "always")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    shown = fast.stdout.splitlines()
    stats = [line for line in shown if line.startswith("[speculative: ")]
    assert len(stats) == 2 and "tokens per target forward]" in stats[0]  # one per answer: the draft ran
    assert [line for line in shown if line not in stats] == plain.stdout.splitlines() and "Paris" in plain.stdout
    bad = chat("--draft", ":99")
    assert bad.returncode == 1 and "a draft of 99 layers" in bad.stderr and "Traceback" not in bad.stderr
    # a candidate tree instead of the chain (a CPU's default), static or dynamic (EAGLE-2): the same
    # conversation, its candidates every round; a bad tree is one line
    for spec, candidates, wrong, says in (("0 1 00", 3, "0 11", "tree candidate 11 has no parent 1"),
                                          ("dynamic:2,3,4", 4, "dynamic:2,2,9", "cannot check 9")):  # fmt: skip
        tree = chat("--draft", ":6", "--draft-tree", spec, "--speculate", "always")
        assert tree.returncode == 0, tree.stderr
        shown = tree.stdout.splitlines()
        stats = [line for line in shown if line.startswith("[speculative: ")]
        assert [line for line in shown if line not in stats] == plain.stdout.splitlines()
        rounds = [int(x.split("/")[1].split()[0]) for x in stats]  # drafted tokens proposed per answer
        assert len(stats) == 2 and all(r % candidates == 0 for r in rounds), spec
        bad = chat("--draft", ":6", "--draft-tree", wrong)
        assert bad.returncode == 1 and says in bad.stderr and "Traceback" not in bad.stderr


def test_callable_package():
    torch.manual_seed(0)
    model = lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny", eos_token_id=None)).eval()
    out = lmlab.generate(model, None, [1, 2, 3], max_new_tokens=5)
    assert len(out) == 1 and len(out[0].token_ids) == 5 and out[0].finish_reason == "length"
