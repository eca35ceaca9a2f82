"""The Bradley-Terry loss against its formula and TRL's RewardTrainer; the saved model loads in transformers."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch

from lmlab.align.data import PairRecord, build_pairs
from lmlab.align.reward_model import RewardLoss, bradley_terry_loss, pair_rewards
from lmlab.model.checkpoint import load_pretrained

G = torch.Generator().manual_seed(0)
RC, RR, M = torch.randn(5, generator=G), torch.randn(5, generator=G), torch.rand(5, generator=G)


def test_bradley_terry_equals_its_formula():
    want = torch.stack([-torch.log(torch.sigmoid(c - r - m)) for c, r, m in zip(RC, RR, M)]).mean()
    assert torch.allclose(bradley_terry_loss(RC, RR, M), want, atol=1e-6)
    centered = want + 0.01 * ((RC + RR) ** 2).mean()
    assert torch.allclose(bradley_terry_loss(RC, RR, M, center=0.01), centered, atol=1e-6)


def test_equals_trl_reward_trainer():
    from trl import RewardTrainer

    t = object.__new__(RewardTrainer)
    ident = lambda x: x
    t.accelerator = SimpleNamespace(gather_for_metrics=ident, gather=ident)
    t.args = SimpleNamespace(center_rewards_coefficient=0.01)
    t._metrics = defaultdict(lambda: defaultdict(list))
    t._total_train_tokens, t._tp_size = 0, 1
    t.model = SimpleNamespace(training=True)
    logits = torch.cat([RC, RR])[:, None]
    model = lambda **kw: SimpleNamespace(logits=logits)
    inputs = {"input_ids": torch.zeros(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3), "margin": M}
    want = float(t.compute_loss(model, inputs))
    assert abs(float(bradley_terry_loss(RC, RR, M, center=0.01)) - want) <= 1e-6


def test_reward_model_scores_like_transformers_and_learns(tiny_rm, tmp_path):
    import transformers

    model, tok = load_pretrained(tiny_rm)
    assert model.cfg.head == "seq_cls" and model.cfg.num_labels == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    pairs = [PairRecord([{"role": "user", "content": f"Say {w}"}], w, w[::-1] + " no") for w in
             ["yes", "apple", "blue sky", "ok"]]  # fmt: skip
    data, _ = build_pairs(tok, pairs, 64, 4, shuffle=False)
    batch = data.get_batch(0)
    with torch.no_grad():
        ours = pair_rewards(model.eval(), batch)
        ids, attn = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)
        theirs = hf(input_ids=ids, attention_mask=attn).logits.view(4, 2)
    assert (ours - theirs).abs().max().item() <= 1e-4
    loss = RewardLoss()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        value = loss(model, batch)
        first = first if first is not None else value.item()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < first
    logged = loss.log_metrics()
    assert set(logged) >= {"accuracy", "margin", "reward_chosen", "reward_rejected"}
