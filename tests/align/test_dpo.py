"""DPO's losses against their formulas and TRL's DPOTrainer, ln 2 at initialisation, and LoRA's reference."""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmlab.align.data import PairRecord, build_pairs
from lmlab.align.dpo import DPOLoss, dpo_loss
from lmlab.align.reference import pair_reference
from lmlab.model.checkpoint import load_pretrained

G = torch.Generator().manual_seed(0)
CHOSEN, REJECTED = torch.randn(6, generator=G) * 3, torch.randn(6, generator=G) * 3
TOKENS_C, TOKENS_R = torch.tensor([3.0, 5, 1, 7, 2, 4]), torch.tensor([2.0, 6, 3, 1, 5, 4])


def test_sigmoid_is_minus_log_sigmoid_of_beta_delta():
    got = dpo_loss(CHOSEN, REJECTED, beta=0.3)
    want = torch.tensor([-math.log(1 / (1 + math.exp(-0.3 * (c - r)))) for c, r in zip(CHOSEN, REJECTED)])
    assert torch.allclose(got, want.float(), atol=1e-6)


def test_ipo_hinge_robust_conservative_closed_forms():
    b, e = 0.25, 0.1
    d = CHOSEN / TOKENS_C - REJECTED / TOKENS_R
    ipo = dpo_loss(CHOSEN, REJECTED, b, "ipo", chosen_tokens=TOKENS_C, rejected_tokens=TOKENS_R)
    assert torch.allclose(ipo, (d - 1 / (2 * b)) ** 2, atol=1e-6)
    delta = CHOSEN - REJECTED
    assert torch.allclose(dpo_loss(CHOSEN, REJECTED, b, "hinge"), torch.relu(1 - b * delta))
    ls = F.logsigmoid
    cdpo = -(1 - e) * ls(b * delta) - e * ls(-b * delta)
    assert torch.allclose(dpo_loss(CHOSEN, REJECTED, b, "sigmoid", e), cdpo, atol=1e-6)
    robust = ((1 - e) * -ls(b * delta) - e * -ls(-b * delta)) / (1 - 2 * e)
    assert torch.allclose(dpo_loss(CHOSEN, REJECTED, b, "robust", e), robust, atol=1e-6)


def _trl_dpo_loss(loss_type: str, beta: float, smoothing: float, logps, ref, comp_mask) -> float:
    """TRL's DPOTrainer._compute_loss on fixed per-token log-probs (a stub model hands them out)."""
    from trl import DPOTrainer

    B2, T = comp_mask.shape
    t = object.__new__(DPOTrainer)
    ident = lambda x: x
    t.accelerator = SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident, unwrap_model=ident)
    stub = SimpleNamespace(training=True)
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros(B2, T - 1), mean_logits=torch.zeros(B2, T - 1),
                              is_top1=torch.zeros(B2, T - 1, dtype=torch.bool))  # fmt: skip
    t.__dict__.update(model=stub, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                      label_smoothing=smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                      _total_train_tokens=0, _tp_size=1)  # fmt: skip
    inputs = {"input_ids": torch.zeros(B2, T, dtype=torch.long), "attention_mask": torch.ones(B2, T),
              "completion_mask": comp_mask, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}  # fmt: skip
    return float(t._compute_loss(lambda **kw: outputs, inputs, False))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "hinge"])
def test_equals_trl_on_fixed_logprobs(loss_type):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 9
    comp = torch.zeros(2 * B, T)
    for i, n in enumerate([3, 5, 2, 6, 4, 1, 7, 3]):
        comp[i, T - n :] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g) * comp[:, 1:]  # TRL's log_probs are shifted, masked
    ref = -torch.rand(B, 2, generator=g) * 5
    smoothing = 0.1 if loss_type == "robust" else 0.0
    want = _trl_dpo_loss(loss_type, 0.2, smoothing, per_token, ref, comp)
    seq = per_token.sum(1).view(2, B).T  # TRL stacks [chosen..., rejected...]
    tokens = comp.sum(1).view(2, B).T
    ours = dpo_loss(seq[:, 0] - ref[:, 0], seq[:, 1] - ref[:, 1], 0.2, loss_type, smoothing, tokens[:, 0], tokens[:, 1])
    assert abs(float(ours.mean()) - want) <= 1e-6


PAIRS = [
    PairRecord([{"role": "user", "content": f"What is {a} + {b}?"}], str(a + b), str(a + b + 1))
    for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (20, 3), (9, 9)]
]


def _dpo_setup(path, tmp_path, **kw):
    model, tok = load_pretrained(path)
    data, _ = build_pairs(tok, PAIRS, 64, 3, seed=0)
    ref = pair_reference(model, data, tmp_path / "ref.safetensors")
    return model, tok, data, ref


def test_loss_is_ln2_at_initialisation_and_reference_is_cached(tiny_chat_llama, tmp_path):
    model, _, data, ref = _dpo_setup(tiny_chat_llama, tmp_path)
    loss = DPOLoss(beta=0.1)
    model.train()
    value = loss(model, data.get_batch(0)).item()
    assert abs(value - math.log(2)) <= 1e-6
    assert (ref < 0).all()
    # a second call reads the cache (no model forward) and gives the same numbers
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    again = pair_reference(model, data, tmp_path / "ref.safetensors")
    assert torch.equal(again, ref) and not calls


def test_lora_dpo_keeps_base_weights_and_holds_one_model(tiny_chat_llama, tmp_path, monkeypatch):
    """LoRA DPO: the base never changes, the reference is the base with adapters off (no copy of the model)."""
    import psutil

    from lmlab.finetune.lora import LoraConfig, apply_lora, lora_layers
    from lmlab.model import ModelConfig, Transformer
    from lmlab.train.config import TrainConfig
    from lmlab.train.trainer import Trainer

    _, tok = load_pretrained(tiny_chat_llama)
    # big enough that a second copy (~90 MB) would stand far above the noise of a step on 2 pairs
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=192, n_head=4, n_kv_head=2,
                                  d_ff=512, n_layer=4, tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(type(x)) or real_deepcopy(x, *a))
    data, _ = build_pairs(tok, PAIRS, 64, 2, seed=0)
    loss = DPOLoss(beta=0.1)
    trainer = Trainer(model, data, TrainConfig(out_dir=str(tmp_path / "run"), max_steps=1, micro_batch_size=2, lr=1e-2,
                      warmup_steps=0, log_every=1, save_checkpoints=False), loss_fn=loss, progress=False)  # fmt: skip
    ref = pair_reference(trainer.raw, data, tmp_path / "ref.safetensors").clone()
    trainer.fit()  # warm up: allocator pools, thread pools, the optimizer's state, the FLOP probe
    trainer.cfg.max_steps = 4
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    start = proc.memory_info().rss
    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        # computed again after a step: with the adapters off it is still the base's
        again = pair_reference(trainer.raw, data, tmp_path / "ref2.safetensors")
        trainer.fit()
    finally:
        stop.set()
        watcher.join()
    assert torch.allclose(again, ref, atol=1e-5)
    assert not any(issubclass(t, torch.nn.Module) for t in copies), copies
    assert peak[0] - start < 0.5 * model_bytes, (
        f"peak grew {(peak[0] - start) / 1e6:.0f} MB; model {model_bytes / 1e6:.0f} MB"
    )
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # bit-identical
    assert any(m.lora_B.weight.detach().abs().sum().item() > 0 for m in lora_layers(model))
    rec = trainer.records()
    assert all("loss" in r and "reward_margin" in r and "reward_accuracy" in r for r in rec)
