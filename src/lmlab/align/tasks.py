"""Verifiable tasks: seeded arithmetic problems whose answers are checked exactly, for GRPO.

GRPO learns only from groups whose completions score differently, so a task must sit where the model is
sometimes right: `easy` (sums and differences of two numbers up to 20) and `hard` (up to 50) put
SmolLM2-135M-Instruct's greedy pass rate at about 33% and 17% (measured in docs/align.md; products of a
two-digit and a one-digit number were tried and gave 6%, too rare a success to learn from). Train and held-out sets never share a question.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_text

LEVELS = ("easy", "hard")
INSTRUCTION = "Answer with the number only."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One question and its exact integer answer."""

    question: str
    answer: int

    @property
    def prompt(self) -> str:
        """What the model is asked."""
        return f"{self.question} {INSTRUCTION}"


def _one(rng: random.Random, level: str) -> Problem:
    top = 20 if level == "easy" else 50  # a sum or a difference of two numbers up to 20 (easy) or 50 (hard)
    a, b = rng.randint(1, top), rng.randint(1, top)
    if rng.random() < 0.5:
        return Problem(f"What is {a} + {b}?", a + b)
    a, b = max(a, b), min(a, b)  # no negative answers
    return Problem(f"What is {a} - {b}?", a - b)


def arithmetic_problems(n: int, level: str = "easy", seed: int = 0, exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems of a level, a pure function of (n, level, seed), none of whose questions is in
    `exclude` (a held-out set's)."""
    if level not in LEVELS:
        raise LmlabError(f"{level!r} must be one of {', '.join(LEVELS)}", field="data.level")
    rng = random.Random(f"{level}-{seed}")
    seen, out = set(exclude or ()), []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        p = _one(rng, level)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    if len(out) < n:
        raise LmlabError(f"only {len(out)} distinct {level} problems are left, {n} asked", field="data.train_size")
    return out


def extract_answer(text: str) -> int | None:
    """The last number in a reply (commas dropped), as an integer if it is one; None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def is_correct(text: str, answer: int | str) -> bool:
    """Exact check: the reply's last number equals the answer."""
    got = extract_answer(text)
    return got is not None and str(got) == str(answer).strip()


def write_split(out_dir: str | os.PathLike, level: str = "easy", train: int = 1000, test: int = 200,
                seed: int = 0) -> dict[str, Path]:  # fmt: skip
    """Write train.jsonl and validation.jsonl ({"prompt", "answer"}) with disjoint questions."""
    held = arithmetic_problems(test, level, seed + 1_000_003)
    fit = arithmetic_problems(train, level, seed, exclude={p.question for p in held})
    out = Path(out_dir)
    paths = {}
    for split, probs in (("train", fit), ("validation", held)):
        lines = "".join(json.dumps({"prompt": p.prompt, "answer": str(p.answer)}) + "\n" for p in probs)
        paths[split] = out / f"{split}.jsonl"
        write_text(paths[split], lines)
    return paths
