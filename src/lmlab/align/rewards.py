"""Reward functions for GRPO: plain Python callables, one float per completion.

A reward function is called as `f(completions, prompts=..., answer=..., **other_fields)` with lists of
equal length (one entry per completion; a prompt's fields repeat for each of its completions) and returns
a list of floats (None: not applicable, counted as 0). Name built-ins (`answer_correct`, `format`) or your
own by dotted path (`mypkg.rewards:length_bonus` or `mypkg.rewards.length_bonus`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from lmlab.align.tasks import is_correct
from lmlab.errors import LmlabError

RewardFn = Callable[..., list[float | None]]
_BARE_NUMBER = re.compile(r"\s*-?\d[\d,]*\.?\s*")


def answer_correct(completions: list[str], answer: list[str | None] | None = None, **_: Any) -> list[float | None]:
    """1 when the completion's last number equals the reference answer, else 0 (None without an answer)."""
    if answer is None:
        raise LmlabError("answer_correct needs an 'answer' field in every prompt record", field="align.reward_funcs")
    return [None if a is None else float(is_correct(c, a)) for c, a in zip(completions, answer)]


def format_reward(completions: list[str], **_: Any) -> list[float]:
    """1 when the completion is a bare number (what the arithmetic prompts ask for), else 0."""
    return [float(_BARE_NUMBER.fullmatch(c) is not None) for c in completions]


BUILTIN: dict[str, RewardFn] = {"answer_correct": answer_correct, "format": format_reward}


def load_reward(spec: str) -> RewardFn:
    """A built-in reward's name, or `module:function` / `module.function` of an importable callable."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    if not module or not name:
        raise LmlabError(f"{spec!r} is neither a built-in reward ({', '.join(BUILTIN)}) nor a dotted path",
                         field="align.reward_funcs")  # fmt: skip
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise LmlabError(f"cannot import {module!r} for reward {spec!r}: {e}", field="align.reward_funcs") from None
    except AttributeError:
        raise LmlabError(f"module {module!r} has no {name!r}", field="align.reward_funcs") from None
    if not callable(fn):
        raise LmlabError(f"{spec!r} is not callable", field="align.reward_funcs")
    return fn


def reward_name(spec: str) -> str:
    """The key a reward is logged under: its last name component."""
    return re.split(r"[.:]", spec)[-1]
