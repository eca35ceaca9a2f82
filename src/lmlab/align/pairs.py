"""Honest preference and prompt sets that build offline (no human preference set installs offline).

Each is named for what it is, and none is a human judgment:
- `<fetched dialogue set>-mismatched` (e.g. chatterbot-mismatched): chosen = the reply the conversation
  really has, rejected = the reply of another, randomly drawn conversation in the same language. A model
  that prefers the chosen one has learned that a reply should answer its question.
- `arithmetic-easy` / `arithmetic-hard`: as pairs, chosen = the correct answer, rejected = a corrupted
  one (off by a small amount, or with two digits swapped); as prompts, the questions with their answers.
Each build is a pure function of (name, sizes, seed) and is written under OUT/data with a SOURCE.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmlab.align import tasks
from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_text

ARITHMETIC = {"arithmetic-easy": "easy", "arithmetic-hard": "hard"}
SUFFIX = "-mismatched"


def is_builtin(name: str | None) -> bool:
    """Whether a data.dataset name is one of the sets built here."""
    return bool(name) and (name in ARITHMETIC or name.endswith(SUFFIX))


def corrupt(answer: int, rng: random.Random) -> int:
    """A wrong answer near the right one: off by 1-10, or (two or more digits) two digits swapped."""
    digits = str(abs(answer))
    if len(digits) > 1 and rng.random() < 0.3:
        i = rng.randrange(len(digits) - 1)
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
        value = int(swapped) * (1 if answer >= 0 else -1)
        if value != answer:
            return value
    return answer + rng.choice([-1, 1]) * rng.randint(1, 10)


def arithmetic_pairs(problems: list[tasks.Problem], seed: int = 0) -> list[dict[str, Any]]:
    """{"prompt", "chosen", "rejected"}: the correct answer against a corrupted one."""
    rng = random.Random(seed)
    return [{"prompt": p.prompt, "chosen": str(p.answer), "rejected": str(corrupt(p.answer, rng))} for p in problems]


def mismatched_pairs(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """From chat records ({"messages", "lang"?}): the first user turn, its real reply (chosen) and the first reply
    of another conversation in the same language (rejected)."""
    convs = []
    for r in records:
        msgs = r.get("messages") or []
        if len(msgs) >= 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
            convs.append((msgs[0]["content"], msgs[1]["content"], r.get("lang")))
    rng = random.Random(seed)
    out = []
    for prompt, reply, lang in convs:
        # another question's reply: a conversation with the same question may have an equally good reply
        others = [c for c in rng.sample(convs, min(len(convs), 20)) if c[2] == lang and c[0] != prompt]
        if others:
            out.append({"prompt": prompt, "chosen": reply, "rejected": others[0][1]})
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build(name: str, out_dir: str | Path, kind: str, sizes: dict[str, int], seed: int = 0,
          where: dict[str, Any] | None = None) -> dict[str, Path]:  # fmt: skip
    """Build a named set as `kind` ("pairs" or "prompts") into out_dir: {split: path} for train and validation."""
    out = Path(out_dir)
    n_train, n_val = int(sizes.get("train", 1000)), int(sizes.get("validation", 200))
    if name in ARITHMETIC:
        level = ARITHMETIC[name]
        held = tasks.arithmetic_problems(n_val, level, seed + 1_000_003)
        fit = tasks.arithmetic_problems(n_train, level, seed, exclude={p.question for p in held})
        if kind == "pairs":
            rows = {"train": arithmetic_pairs(fit, seed), "validation": arithmetic_pairs(held, seed + 1)}
            how = "chosen = the correct answer, rejected = a corrupted one (off by 1-10 or two digits swapped)"
        else:
            rows = {s: [{"prompt": p.prompt, "answer": str(p.answer)} for p in ps]
                    for s, ps in (("train", fit), ("validation", held))}  # fmt: skip
            how = "questions with their exact answers"
    elif name.endswith(SUFFIX):
        if kind != "pairs":
            raise LmlabError(f"{name} is a preference set; RL prompts need another data set", field="data.dataset")
        from lmlab.data import fetch
        from lmlab.finetune.task_data import iter_jsonl

        src = Path(fetch(name.removesuffix(SUFFIX)))
        rows = {}
        # held-out pairs come from the set's validation and test conversations (never seen in training)
        for split, files, n in (("train", ["train"], n_train), ("validation", ["validation", "test"], n_val)):
            recs = [r for f in files if (src / f"{f}.jsonl").exists() for _, r in iter_jsonl(src / f"{f}.jsonl")
                    if all(r.get(k) == v for k, v in (where or {}).items())]  # fmt: skip
            pairs = mismatched_pairs(recs, seed)
            rows[split] = random.Random(seed).sample(pairs, min(n, len(pairs)))
        how = ("chosen = the conversation's real first reply, rejected = the first reply of another conversation "
               "in the same language, drawn at random")  # fmt: skip
    else:
        raise LmlabError(f"unknown built set {name!r}", field="data.dataset")
    paths = {s: _write(out / f"{s}.jsonl", r) for s, r in rows.items()}
    note = (f"# {name} ({kind})\n\nBuilt offline by lmlab.align.pairs with seed {seed}: {how}.\n"
            f"Synthetic labels, not human judgments. Counts: "
            + ", ".join(f"{s} {len(r)}" for s, r in rows.items()) + "\n")  # fmt: skip
    write_text(out / "SOURCE.md", note)
    return paths
