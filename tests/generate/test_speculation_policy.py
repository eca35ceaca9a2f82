"""The lone-row policy: speculative rounds only while they measure faster than plain steps."""

from __future__ import annotations

import pytest

from lmlab.generate.speculation_policy import SpeculationPolicy


def _drive(policy: SpeculationPolicy, seconds_per_token: dict[bool, float], steps: int, tokens: dict[bool, int]):
    """Run `steps` decisions with fixed costs; returns the ways taken."""
    ways = []
    for _ in range(steps):
        way = policy.speculate()
        ways.append(way)
        policy.record(way, seconds_per_token[way] * tokens[way], tokens[way])
    return ways


@pytest.mark.parametrize("rounds_faster", [True, False])
def test_tries_both_then_keeps_the_faster_and_explores_the_other_ever_more_rarely(rounds_faster):
    policy = SpeculationPolicy(explore_every=20, burst=3)
    # a round gives 3 tokens; per token it costs 10 ms (or 40 ms) against a plain step's 20 ms
    cost = {True: 0.010 if rounds_faster else 0.040, False: 0.020}
    ways = _drive(policy, cost, 3 + 3 + (20 + 3) + (40 + 3) + (80 + 3), {True: 3, False: 1})
    assert ways[:6] == [True] * 3 + [False] * 3  # each way measured first, rounds first
    # 20 steps the faster way, 3 the slower (its estimate refreshed); still slower: 40 before the next look
    fast, slow = [rounds_faster], [not rounds_faster]
    assert ways[6:] == fast * 20 + slow * 3 + fast * 40 + slow * 3 + fast * 80 + slow * 3
    assert policy.every == 80 and policy.speculate() == rounds_faster and policy.every == 160  # judged after
    assert policy.speedup() == pytest.approx(0.020 / cost[True])


def test_a_change_in_cost_is_followed():
    """Rounds were faster; then plain steps get 4x faster (the compiled graph arrived): after the next
    exploration of plain steps the policy switches to them."""
    policy = SpeculationPolicy(explore_every=10, burst=4, alpha=0.5)
    assert _drive(policy, {True: 0.010, False: 0.020}, 8 + 10, {True: 3, False: 1})[-10:] == [True] * 10
    ways = _drive(policy, {True: 0.010, False: 0.005}, 18, {True: 3, False: 1})
    # the due exploration of plain steps finds them faster: they stay, rounds become the explored way, and
    # the wait starts over (10 steps, not 20)
    assert ways == [False] * 4 + [False] * 10 + [True] * 4


def test_always_and_bad_modes():
    policy = SpeculationPolicy("always")
    assert _drive(policy, {True: 1.0, False: 0.001}, 50, {True: 1, False: 1}) == [True] * 50
    with pytest.raises(ValueError, match="'auto' or 'always'"):
        SpeculationPolicy("sometimes")
    policy = SpeculationPolicy()
    policy.record(True, 0.5, 0)  # a step that gave nothing (a cancelled row) teaches nothing
    assert policy.seen[True] == 0 and policy.speedup() is None


def test_an_exploration_replaces_a_stale_estimate():
    """Plain steps measured slow at first (eager, a compile running): 5x their later cost. One exploration
    burst of the now-fast plain steps is enough to switch to them (blended with the stale figure, it
    would not have been)."""
    policy = SpeculationPolicy(explore_every=10, burst=4, alpha=0.2)
    _drive(policy, {True: 0.010, False: 0.050}, 8 + 10, {True: 3, False: 1})
    ways = _drive(policy, {True: 0.010, False: 0.005}, 4 + 10, {True: 3, False: 1})
    assert ways == [False] * 4 + [False] * 10 and policy.cost[False] == pytest.approx(0.005)


def test_a_one_step_exploration_that_finds_a_new_winner_starts_the_wait_over():
    """A chat explores one answer at a time (burst 1): when that answer shows the other way is now faster,
    the policy switches and looks back after `explore_every`, not after a doubled wait."""
    policy = SpeculationPolicy(explore_every=4, burst=1, alpha=0.5)
    ways = _drive(policy, {True: 0.010, False: 0.020}, 2 + 4 + 1 + 8, {True: 3, False: 1})
    assert ways == [True, False] + [True] * 4 + [False] + [True] * 8 and policy.every == 8
    ways = _drive(policy, {True: 0.010, False: 0.002}, 1 + 4 + 1, {True: 3, False: 1})
    # the due look at plain steps finds them 5x faster: plain from then on, rounds looked at after 4
    assert ways == [False] + [False] * 4 + [True] and policy.every == 4
    assert policy.reason == "exploring"


def test_rounds_are_rated_by_their_tokens_not_by_a_mean_of_per_round_rates():
    """Rounds of 24 ms giving 1 and 3 tokens in turn make 12 ms a token over a run; plain steps take 14 ms.
    The policy must see rounds as faster (a mean of per-round rates, 24 and 8 ms, would say 16 ms)."""
    policy = SpeculationPolicy()
    for i in range(40):
        policy.record(True, 0.024, 1 + 2 * (i % 2))
    for _ in range(10):
        policy.record(False, 0.014, 1)
    assert policy.cost[True] == pytest.approx(0.012, rel=0.15)
    assert policy.speculate() is True and policy.reason == "faster"
