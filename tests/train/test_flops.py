"""The FLOPs MFU counts: by hand on a tiny model, and against torch's FlopCounterMode on real steps."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lmlab
from lmlab.finetune.freeze import freeze
from lmlab.finetune.lora import LoraConfig, apply_lora
from lmlab.kernels import fused
from lmlab.train.flops import StepCounts, batch_counts, step_flops

# llama-tiny: d 64, 4 heads of 16 (2 KV heads), d_ff 176, vocab 512, 2 layers, untied head
D, HD, FF, V = 64, 16, 176, 512
QKV = 2 * D * (4 * HD) + 2 * 2 * D * (2 * HD)  # q, k, v: 8192 + 4096 + 4096
O_PROJ, MLP = 2 * (4 * HD) * D, 3 * 2 * D * FF
PAIR = 2 * 2 * 4 * HD  # scores and weighted sum, 4 heads
HEAD = 2 * D * V


def tiny():
    torch.manual_seed(0)
    return lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny"))


def test_full_training_is_three_forwards():
    counts = StepCounts(tokens=10, pairs=55, rows=10)
    fwd = 2 * (QKV + O_PROJ + MLP) * 10 + 2 * PAIR * 55 + HEAD * 10
    assert step_flops(tiny(), counts, backward=False) == fwd
    # everything trains: input and weight gradients for each matmul, attention backward twice its forward
    assert step_flops(tiny(), counts) == 3 * fwd


def test_lora_step_hand_count():
    model = apply_lora(tiny(), LoraConfig(r=4, targets=["q", "v"]))
    lq, lv = 2 * D * 4 + 2 * 4 * (4 * HD), 2 * D * 4 + 2 * 4 * (2 * HD)  # A then B of q (512 + 512), of v
    bq, bv = 2 * 4 * (4 * HD), 2 * 4 * (2 * HD)  # B's share alone
    # layer 0: nothing below trains, so the frozen q/k/v need no input gradient; the LoRA weights get
    # weight gradients, and B an input gradient (A trains)
    layer0_qkv = QKV + lq + lv + (lq + bq) + (lv + bv)
    # layer 1: input gradients everywhere (layer 0's adapters are below), weight gradients only for A, B
    layer1_qkv = QKV + lq + lv + QKV + (lq + lq) + (lv + lv)
    rest_of_layer = 2 * (O_PROJ + MLP)  # forward + input gradient, no weight gradient
    per_token = layer0_qkv + layer1_qkv + 2 * rest_of_layer
    per_pair = 2 * 3 * PAIR
    per_row = 2 * HEAD  # forward + input gradient; the frozen head has no weight gradient
    counts = StepCounts(tokens=12, pairs=78, rows=5)
    assert step_flops(model, counts) == per_token * 12 + per_pair * 78 + per_row * 5


def test_frozen_trunk_hand_count():
    model = tiny()
    freeze(model, ["embeddings", "layers.0"])  # layer 1, the final norm and the head train
    layer0 = QKV + O_PROJ + MLP  # forward only: nothing at or below it trains
    layer1 = 3 * (QKV + O_PROJ + MLP)  # layer 1's norm1 trains and sits below q, k, v: their input gradient counts
    counts = StepCounts(tokens=8, pairs=36, rows=8)
    expected = (layer0 + layer1) * 8 + (PAIR + 3 * PAIR) * 36 + 3 * HEAD * 8
    assert step_flops(model, counts) == expected


def test_batch_counts_packing_padding_and_targets():
    model = tiny()
    docs = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, -100, 7, -100], [-100, -100, 1, 2, 3, 4]])
    c = batch_counts(model, {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": labels, "document_ids": docs})
    assert (c.tokens, c.pairs, c.rows) == (11, 6 + 3 + 21, 3 + 4)  # shifted: position t predicts labels[t + 1]
    x, y = torch.zeros(3, 4, dtype=torch.long), torch.full((3, 4), 1)
    y[0, :2] = -100
    assert batch_counts(model, (x, y)) == StepCounts(12, 3 * 10, 10)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    c = batch_counts(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    assert (c.tokens, c.pairs) == (7, 6 + 10)


def _counted_matmul_flops(model, x, y) -> int:
    """FLOPs torch counts in the matmuls (mm/addmm) of one forward + backward, the head run as plain layers
    on the rows with targets (as the chunked loss does; its in-place addmm_ is not in torch's table)."""
    counter = FlopCounterMode(display=False)
    with counter:
        keep = y != -100
        torch.nn.functional.cross_entropy(model(x, logits_mask=keep), y[keep]).backward()
    ops = counter.get_flop_counts()["Global"]
    return sum(v for k, v in ops.items() if str(k).split(".")[1] in ("mm", "addmm"))


@pytest.mark.parametrize("setup", ["full", "lora", "frozen", "lora_all_linear"])
def test_matmul_flops_equal_torchs_count(setup, monkeypatch):
    monkeypatch.setattr(fused, "enabled", False)  # torch's own ops, which FlopCounterMode knows
    model = tiny()
    if setup == "lora":
        apply_lora(model, LoraConfig(r=4, targets=["q", "v"]))
    elif setup == "lora_all_linear":
        apply_lora(model, LoraConfig(r=8, targets="all-linear"))
    elif setup == "frozen":
        freeze(model, ["embeddings", "layers.0"])
    x = torch.randint(0, V, (3, 10))
    y = torch.randint(0, V, (3, 10))
    y[:, :4] = -100  # the head projects only the 18 rows with targets
    counts = batch_counts(model, (x, y))
    assert counts.rows == 18
    expected = step_flops(model, StepCounts(counts.tokens, 0, counts.rows))
    assert _counted_matmul_flops(model, x, y) == expected
