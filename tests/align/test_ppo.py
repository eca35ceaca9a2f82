"""PPO's pieces against hand computations: GAE, whitening, the clipped losses at the clip edges, KL, the controller."""

from __future__ import annotations

import math

import torch

from lmlab.align.ppo import KLController, gae, kl_estimate, policy_loss, value_loss, whiten


def test_gae_equals_the_hand_recurrence():
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 2.0, 0.0, 0.0]])
    v = torch.tensor([[0.3, 0.2, 0.1, 0.4, 0.0], [0.1, -0.1, 0.2, 0.0, 0.0]])
    m = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # completions at columns 1-3 and 0-2
    adv, ret = gae(r, v, m, gamma, lam)
    for b in range(2):
        cols = [t for t in range(5) if m[b, t]]
        want, last = {}, 0.0
        for i in reversed(range(len(cols))):
            t = cols[i]
            nxt = float(v[b, cols[i + 1]]) if i + 1 < len(cols) else 0.0
            delta = float(r[b, t]) + gamma * nxt - float(v[b, t])
            last = delta + gamma * lam * last
            want[t] = last
        for t in range(5):
            assert math.isclose(float(adv[b, t]), want.get(t, 0.0), abs_tol=1e-6)
            assert math.isclose(float(ret[b, t]), want[t] + float(v[b, t]) if t in want else 0.0, abs_tol=1e-6)


def test_whiten_has_zero_mean_unit_variance_on_the_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    m = torch.ones(4, 6)
    m[0, 4:] = 0
    w = whiten(x, m)
    assert abs(float(w[m.bool()].mean())) < 1e-6 and abs(float(w[m.bool()].std()) - 1) < 1e-4
    assert torch.equal(w[~m.bool()], torch.zeros(2))


def test_policy_loss_at_the_clip_edges():
    clip = 0.2
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    # ratios just inside and outside 1 +- clip, for positive and negative advantages
    for ratio, a in [(1.2, 1.0), (1.3, 1.0), (0.8, -1.0), (0.7, -1.0), (0.7, 1.0), (1.3, -1.0)]:
        logp = torch.full((1, 4), math.log(ratio))
        adv = torch.full((1, 4), a)
        loss, clipfrac = policy_loss(logp, old, adv, mask, clip)
        want = max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
        assert math.isclose(float(loss), want, rel_tol=1e-6)
        if abs(abs(ratio - 1) - clip) > 1e-3:  # at the edge itself float32 rounding decides
            assert float(clipfrac) == float(abs(ratio - 1) > clip)
    # past the edge in the direction the advantage pushes, no gradient flows
    logp = torch.full((1, 4), math.log(1.3), requires_grad=True)
    policy_loss(logp, old, torch.ones(1, 4), mask, clip)[0].backward()
    assert torch.equal(logp.grad, torch.zeros(1, 4))


def test_value_loss_at_the_clip_edges():
    clip = 0.2
    old, ret, mask = torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)
    for v in [0.2, 0.5, -0.3, 1.5]:
        values = torch.full((1, 3), v)
        loss, _ = value_loss(values, old, ret, mask, clip)
        clipped = min(max(v, -clip), clip)
        want = 0.5 * max((v - 1) ** 2, (clipped - 1) ** 2)
        assert math.isclose(float(loss), want, rel_tol=1e-6)


def test_kl_estimators_and_the_adaptive_controller():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), logp - ref)
    k3 = kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all() and float(k3[2]) == 0.0
    c = KLController(0.1, target=6.0, horizon=100)
    c.update(9.0, 10)  # KL above target: error clipped to 0.2
    assert math.isclose(c.coef, 0.1 * (1 + 0.2 * 10 / 100))
    c.update(3.0, 10)  # below: -0.2
    assert math.isclose(c.coef, 0.1 * 1.02 * (1 - 0.2 * 10 / 100))
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.coef == 0.1
