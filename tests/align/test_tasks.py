"""Arithmetic problems: seeded, distinct, held-out disjoint from training; exact answer checks; rewards."""

from __future__ import annotations

import pytest

from lmlab.align import pairs
from lmlab.align.rewards import answer_correct, format_reward, load_reward
from lmlab.align.tasks import arithmetic_problems, extract_answer, is_correct, write_split
from lmlab.errors import LmlabError


def test_problems_are_seeded_distinct_and_correct():
    a, b = arithmetic_problems(200, "easy", 3), arithmetic_problems(200, "easy", 3)
    assert a == b and len({p.question for p in a}) == 200
    for p in a + arithmetic_problems(50, "hard", 0):
        assert eval(p.question.removeprefix("What is ").removesuffix("?")) == p.answer
    assert arithmetic_problems(5, "easy", 4) != a[:5]


def test_split_is_disjoint(tmp_path):
    import json

    paths = write_split(tmp_path, "hard", train=300, test=100)
    q = {s: {json.loads(line)["prompt"] for line in p.read_text().splitlines()} for s, p in paths.items()}
    assert len(q["train"]) == 300 and len(q["validation"]) == 100 and not q["train"] & q["validation"]


@pytest.mark.parametrize("text, answer, ok", [("42", 42, True), ("12 + 30 = 42", "42", True), ("42.", 42, True),
    ("The answer is 1,042", 1042, True), ("41", 42, False), ("no idea", 42, False), ("42.5", 42, False)])  # fmt: skip
def test_exact_answer_check(text, answer, ok):
    assert is_correct(text, answer) is ok


def test_builtin_rewards_and_corrupted_pairs():
    assert answer_correct(["7", "8", "x"], answer=["7", "7", None]) == [1.0, 0.0, None]
    assert format_reward([" 7", "7 apples", "-12.", "1,000"]) == [1.0, 0.0, 1.0, 1.0]
    assert extract_answer("3 - 5 = -2") == -2
    rows = pairs.arithmetic_pairs(arithmetic_problems(100, "easy", 0), 0)
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_reward_paths_that_do_not_import_name_the_problem():
    assert load_reward("lmlab.align.rewards:format_reward") is format_reward
    assert load_reward("lmlab.align.rewards.answer_correct") is answer_correct
    with pytest.raises(LmlabError, match=r"cannot import 'no_such_pkg\.mod'") as e:
        load_reward("no_such_pkg.mod:fn")
    assert e.value.field == "align.reward_funcs"
    with pytest.raises(LmlabError, match="has no 'nope'"):
        load_reward("lmlab.align.rewards:nope")
