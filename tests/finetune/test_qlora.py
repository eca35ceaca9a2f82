"""LoRA on a quantized base (QLoRA-style): the base stays int4 codes, bit for bit, through training;
at the start the model computes exactly what the quantized base computes; the adapter learns,
saves, and loads onto a fresh quantized base; merging into codes is refused with one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmlab.compress.quantize import quantize_model
from lmlab.errors import LmlabError
from lmlab.finetune.lora import LoraConfig, LoRALinear, apply_lora, load_adapter, merge_and_unload, save_adapter
from lmlab.model.config import ModelConfig
from lmlab.model.quantized import QuantConfig, QuantLinear
from lmlab.model.transformer import Transformer


def _quantized() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(ModelConfig.from_preset("llama-tiny"), d_ff=192))
    quantize_model(model, QuantConfig(bits=4, group_size=32))
    return model


def test_qlora_trains_the_adapter_only(tmp_path):
    model = _quantized()
    ids = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        before = model(ids)
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "offsets"))}
    apply_lora(model, LoraConfig(r=4, targets=["q", "k", "v", "o", "gate", "up", "down"]))
    assert sum(isinstance(m, LoRALinear) and isinstance(m.quantized_base, QuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B starts at zero: the quantized base exactly
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(ids, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = {n: b for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "offsets"))}
    assert {n.replace(".quantized_base", "") for n in after} == set(codes)
    for name, b in after.items():
        original = name.replace(".quantized_base", "")
        assert torch.equal(b, codes[original])
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(_quantized(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=1e-6)
    with pytest.raises(LmlabError, match="cannot be merged"):
        merge_and_unload(model)


def test_qlora_on_int8_with_integer_prefill_activations_gets_the_float_gradient():
    """An int8 per-channel base defaults to int24 activations for inputs of more than 64 rows (a VNNI
    CPU's policy), and integer rounding has no gradient: where one is needed the layer takes the float
    path, so the adapters' gradients equal those over a base with float32 activations (128 rows here)."""
    grads = {}
    for activations in ("int24", "float32"):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(ModelConfig.from_preset("llama-tiny"), d_ff=192))
        quantize_model(model, QuantConfig(bits=8, activations=activations))
        apply_lora(model, LoraConfig(r=4, targets=["q", "k", "v", "o", "gate", "up", "down"]))
        for m in model.modules():  # B = 0 would hide the base's backward path: give the adapters weight
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
        model.loss(ids, ids).backward()
        grads[activations] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["int24"].keys() == grads["float32"].keys()
    for name, g in grads["float32"].items():
        torch.testing.assert_close(grads["int24"][name], g, rtol=1e-3, atol=1e-6, msg=name)
