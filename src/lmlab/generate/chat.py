"""A streaming multi-turn chat over the checkpoint's chat template, and the REPL around it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

from lmlab.errors import LmlabError
from lmlab.generate import decode
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import stream
from lmlab.generate.draft_tree import DraftTree, DynamicTree
from lmlab.generate.kv_cache import PromptCache
from lmlab.generate.speculation_policy import SpeculationPolicy
from lmlab.generate.speculative import SpeculativeStats, check_draft, speculative_stream
from lmlab.generate.speculative import precompile as precompile_rounds
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer

HELP = "commands: /reset  /system TEXT  /set NAME VALUE (e.g. /set temperature 0.7)  /show  /quit"


class ChatSession:
    """The conversation so far, and how to continue it."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: GenerationConfig,
        system: str | None = None,
        draft: Transformer | None = None,
        num_draft_tokens: int = 4,
        draft_confidence: float | None = None,
        speculate: str = "auto",
        draft_tree: DraftTree | DynamicTree | str | None = "auto",
    ) -> None:
        if tokenizer.chat_template is None:
            raise LmlabError("this checkpoint has no chat template", hint="use `lmlab generate` for plain text")
        self.model, self.tokenizer, self.config, self.system = model, tokenizer, config, system
        # speculative decoding (generate/speculative.py): the same answers, sooner when the draft agrees
        if draft is not None:
            check_draft(model, draft)
        self.draft, self.num_draft_tokens, self.draft_confidence = draft, num_draft_tokens, draft_confidence
        self.draft_tree = draft_tree  # rounds' candidate tree ("auto": the device's default; None: a chain)
        self.stats = None  # the last answer's SpeculativeStats, when it was speculative
        # speculative answers only while they measure faster (seconds per character of answer) than plain
        # ones: those run as a compiled graph once its background compile is done, which eager rounds
        # with a middling draft do not beat (docs/serve.md); one answer the other way every 8 or more
        self.policy = SpeculationPolicy(speculate, explore_every=8, burst=1, alpha=0.5) if draft is not None else None
        self.messages: list[dict[str, str]] = []
        # the conversation's keys/values, kept from answer to answer: a turn runs only its new tokens
        # (the question, and the template's tokens around it) instead of the whole conversation again
        self.past = PromptCache()
        self.dropped = 0  # messages the last turn dropped to fit the model's context (`fit`)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set(self, name: str, value: str) -> None:
        """Change one generation setting, parsed to the field's type and validated."""
        fields = {f.name: f for f in dataclasses.fields(GenerationConfig)}
        if name not in fields or name in ("stop", "stop_token_ids", "logprobs"):
            raise LmlabError(f"unknown setting {name!r}", hint="e.g. temperature, top_p, top_k, max_new_tokens, seed")
        current = getattr(self.config, name)
        if isinstance(current, bool):  # compile, early_stopping
            switches = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
            if value.lower() not in switches:
                raise LmlabError(f"{value!r} is not true or false", field=name)
            self.config = self.config.replace(**{name: switches[value.lower()]})
            return
        try:
            parsed = int(value) if isinstance(current, int) else float(value)
        except ValueError:
            raise LmlabError(f"{value!r} is not a number", field=name) from None
        if name == "seed":
            parsed = int(value)
        self.config = self.config.replace(**{name: parsed})

    def prompt(self, messages: list[dict[str, str]] | None = None) -> str:
        """The templated text for the next assistant turn (after `messages`, default the conversation's)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = self.messages if messages is None else messages
        return self.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)

    def precompile(self, question_tokens: int = 64) -> None:
        """Start compiling, in the background, the graphs the next answer will run, for a question of a
        few tokens and of `question_tokens` (compile "auto" only). `repl` calls it while the user types:
        a conversation outgrows its graphs' width (a power of two: `decode.capacity_for`) every few
        answers, and the answer that crossed it ran eagerly while its graphs compiled on the same cores.
        Graphs already built or compiling are only looked up."""
        if self.config.compile != "auto":
            return
        # the next prompt: the conversation, an empty question's template around it, the question
        n = len(self.tokenizer.encode(self.prompt([*self.messages, {"role": "user", "content": ""}])))
        for length in (n, n + question_tokens):  # often one width; else the next one too, ahead of need
            if self.policy is None or self.policy.mode != "always":
                decode.precompile(self.model, length, self.config)
            if self.draft is not None:
                precompile_rounds(self.model, self.draft, length, self.config, self.num_draft_tokens, self.draft_tree)

    def fit(self) -> list[int]:
        """The next prompt's tokens, after dropping the oldest exchanges (a question and its answer) until
        it and `max_new_tokens` fit the model's context (its `max_seq_len`, as `lmlab serve` counts it);
        `dropped` says how many messages went. The system prompt and the newest question always stay."""
        self.dropped = 0
        limit = self.model.cfg.max_seq_len - self.config.max_new_tokens
        ids = self.tokenizer.encode(self.prompt())
        if len(ids) > limit:
            alone = len(self.tokenizer.encode(self.prompt(self.messages[-1:])))
            if alone > limit:  # not even the question alone fits: refused, and nothing is dropped for it
                self.messages.pop()
                raise LmlabError(f"the question's prompt ({alone} tokens) and max_new_tokens "
                                 f"({self.config.max_new_tokens}) exceed the model's context of "
                                 f"{self.model.cfg.max_seq_len} tokens", field="max_new_tokens")  # fmt: skip
        while len(ids) > limit:
            n = min(2, len(self.messages) - 1)  # (an unanswered question, if any, goes alone; the newest stays)
            del self.messages[:n]
            self.dropped += n
            ids = self.tokenizer.encode(self.prompt())
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer; the answer joins the history when done.
        A conversation that outgrows the model's context loses its oldest exchanges first (`fit`, done
        in this call, before the answer is iterated)."""
        self.messages.append({"role": "user", "content": text})
        return self._answer(self.fit())

    def _answer(self, prompt: list[int]) -> Iterator[str]:
        pieces = []
        speculative = self.policy is not None and self.policy.speculate()
        self.stats = None
        if not speculative:
            answer = stream(self.model, self.tokenizer, prompt, self.config, past=self.past)
        else:
            extra = {} if self.draft_confidence is None else {"confidence": self.draft_confidence}
            self.stats = SpeculativeStats()
            answer = speculative_stream(self.model, self.draft, self.tokenizer, prompt, self.config,
                                        self.num_draft_tokens, stats=self.stats, past=self.past, tree=self.draft_tree,
                                        **extra)  # fmt: skip
        start = first = None
        # an answer decoded (partly) eagerly while its graphs compile is not timed: it is not what either
        # way costs once they are built
        compiling = False
        for piece in answer:
            if start is None:  # the clock starts at the first piece: decoding, not the prompt's prefill
                start, first = time.perf_counter(), len(piece)
                compiling = bool(self.config.compile and decode.compiles_pending())
            pieces.append(piece)
            yield piece
        text = "".join(pieces)
        compiling = compiling or bool(self.config.compile and decode.compiles_pending())
        if self.policy is not None and start is not None and not compiling:
            self.policy.record(speculative, time.perf_counter() - start, len(text) - first)
        self.messages.append({"role": "assistant", "content": text})


def repl(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> None:
    """Read lines until /quit or end of input; stream each answer as it is generated."""

    def out(s: str) -> None:
        if write is not None:
            write(s)
        else:
            print(s, end="", flush=True)

    out(HELP + "\n")
    while True:
        session.precompile()  # while the user types
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                session.reset()
                out("(conversation cleared)\n")
            elif line.startswith("/system"):
                session.system = line[len("/system") :].strip() or None
                session.reset()
                out(f"(system prompt: {session.system!r}; conversation cleared)\n")
            elif line.startswith("/set"):
                parts = line.split()
                if len(parts) != 3:
                    raise LmlabError("usage: /set NAME VALUE")
                session.set(parts[1], parts[2])
                out(f"({parts[1]} = {getattr(session.config, parts[1])})\n")
            elif line == "/show":
                out(f"{session.config}\n")
            elif line.startswith("/"):
                out(HELP + "\n")
            else:
                answer = session.reply(line)
                if session.dropped:
                    out(f"(the {session.dropped} oldest messages were dropped to fit the model's context of "
                        f"{session.model.cfg.max_seq_len} tokens)\n")  # fmt: skip
                out("assistant> ")
                for piece in answer:
                    out(piece)
                out("\n")
                if session.stats is not None:  # how the draft did: the answer is the same either way
                    st = session.stats
                    out(f"[speculative: {st.accepted}/{st.proposed} drafted tokens accepted ({st.acceptance_rate:.0%}), "
                        f"{st.tokens_per_round:.2f} tokens per target forward]\n")  # fmt: skip
                elif session.policy is not None:
                    why = {"faster": "measured faster than speculative rounds so far"}
                    out(f"[plain decoding: {why.get(session.policy.reason, 'timed against speculative rounds')}]\n")
        except LmlabError as e:
            out(f"error: {e}\n")
