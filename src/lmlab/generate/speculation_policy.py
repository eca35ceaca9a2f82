"""When to decode by speculative rounds: only while they give more tokens per second than plain steps.

A server decides before each step of a lone request (serve/engine.py), a chat before each answer
(generate/chat.py).

A round pays when the draft guesses well enough that the tokens it wins outweigh its own steps and
the extra rows of the target's check. That depends on the text (a draft agrees with the target on
~70% of tokens in one kind of chat, ~30% in another), on the draft, on the weights (a check of 5
tokens costs about one step in float32, 2.2-2.5 with Q4_1 blocks on 2 cores: benchmarks/speculative_check.py)
and on whether steps run compiled yet (docs/serve.md). So the engine measures both ways, as seconds per
token over recent steps, and takes the faster, trying the other one for a few steps now and then: the
compiled graphs arrive after a while, and a conversation may turn easier or harder to guess.
(vLLM's dynamic speculative decoding makes the same choice from a cost model; this measures it.)
"""

from __future__ import annotations


class SpeculationPolicy:
    """Chooses, before each step (or answer), speculative rounds (True) or plain steps (False).

    `mode` "always" always speculates (tests, benchmarks of the rounds themselves); "auto" keeps
    seconds per generated token for each way, as running means of seconds and of tokens per step (each
    recorded step weighs `alpha`; their ratio, so that a round of 5 tokens counts 5 times what a round of
    1 does, as in a long run, where a mean of per-step ratios would rate rounds slower than they are),
    takes the faster, and after `explore_every` steps spends `burst` steps on the other one so its
    estimate stays current (an exploration's steps replace the old estimate, which may date from
    before the compiled step was ready). Each exploration that finds the same way faster doubles the wait before
    the next (up to `max_every`): exploring a way that is 2x slower costs its steps, so a clear
    winner is re-checked rarely; one that changes the winner starts over at `explore_every`.
    Before both are known it tries speculation first, then plain steps."""

    def __init__(
        self, mode: str = "auto", explore_every: int = 64, burst: int = 4, alpha: float = 0.2, max_every: int = 1024
    ) -> None:
        if mode not in ("auto", "always"):
            raise ValueError(f"speculate must be 'auto' or 'always', not {mode!r}")
        self.mode, self.explore_every, self.burst, self.alpha = mode, explore_every, burst, alpha
        self.max_every, self.every = max_every, explore_every  # `every`: the current wait between explorations
        self.mean: dict[bool, tuple[float, float] | None] = {True: None, False: None}  # (seconds, tokens) a step
        self.seen = {True: 0, False: 0}  # steps recorded per way
        self.steps = 0  # decisions since the last exploration ended
        self.exploring = False  # the way an exploration burst takes
        self.stale: bool | None = None  # the way whose next recorded step replaces its estimate
        self.reason = ""  # why the last decision went its way

    def speculate(self) -> bool:
        """Which way the next lone step goes (`reason` says why: "measuring", "faster" or "exploring")."""
        if self.mode == "always":
            self.reason = "always"
            return True
        for way in (True, False):  # first `burst` steps each way, speculation first
            if self.seen[way] < self.burst:
                self.reason = "measuring"
                return way
        self.steps += 1
        faster = self.cost[True] <= self.cost[False]
        if self.steps > self.every + self.burst:  # an exploration just ended, all its steps recorded
            # the way explored stayed slower: look at it half as often from now on; it won: start over
            self.every = min(2 * self.every, self.max_every) if faster != self.exploring else self.explore_every
            self.steps = 1
        if self.steps <= self.every:
            self.reason = "faster"
            return faster
        if self.steps == self.every + 1:  # the slower way, for `burst` steps, then back
            self.exploring = not faster
            self.stale = self.exploring  # its estimate is old (eager steps then, a compile running): start anew
        self.reason = "exploring"
        return self.exploring

    def record(self, speculative: bool, seconds: float, tokens: int) -> None:
        """A lone step went `speculative` way and gave `tokens` tokens in `seconds`."""
        if tokens <= 0:
            return
        old = self.mean[speculative] if self.stale != speculative else None
        self.stale = None if self.stale == speculative else self.stale
        if old is None:
            mean = (seconds, float(tokens))
        else:
            mean = (old[0] + self.alpha * (seconds - old[0]), old[1] + self.alpha * (tokens - old[1]))
        self.mean[speculative] = mean
        self.seen[speculative] += 1

    @property
    def cost(self) -> dict[bool, float | None]:
        """Seconds per generated token, per way (None: not measured yet)."""
        return {way: m[0] / m[1] if m is not None else None for way, m in self.mean.items()}

    def speedup(self) -> float | None:
        """Measured plain seconds per token over speculative's: above 1, rounds pay."""
        if self.cost[True] is None or self.cost[False] is None:
            return None
        return self.cost[False] / self.cost[True]
