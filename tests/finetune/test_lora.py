"""LoRA against peft: same base + adapter -> same logits both ways, merge/unmerge, what gets trained."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from lmlab.finetune.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lmlab.model.checkpoint import load_pretrained
from lmlab.train.config import TrainConfig
from lmlab.train.optim import build_optimizer
from tests.conftest import hf_tiny

TOL = 1e-5
# (family, peft target_modules, our targets)
CASES = {
    "llama-attn-mlp": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2-qv": ("qwen2", ["q_proj", "v_proj"]),
    "gpt2-proj": ("gpt2", ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


def _randomize_lora(model: torch.nn.Module, seed: int = 3) -> None:
    """Zero-initialized B would make every adapter a no-op; give all adapter weights real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids():
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lmlab_and_lmlab_adapter_loads_in_peft(case, tmp_path):
    family, targets = CASES[case]
    base = hf_tiny(family)
    base.save_pretrained(tmp_path / "base")
    ids, mask = _ids()
    real = mask.bool()

    # peft -> lmlab
    theirs = peft.get_peft_model(
        hf_tiny(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    )
    _randomize_lora(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours, _ = load_pretrained(tmp_path / "base")
    load_adapter(ours, tmp_path / "peft")
    assert len(lora_layers(ours)) == len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    diff = (_logits(ours, ids, mask) - _logits(theirs, ids, mask))[real].abs().max().item()
    assert diff <= TOL, f"peft -> lmlab: {diff:.2e}"

    # lmlab -> peft: a fresh adapter with other random weights
    ours2, _ = load_pretrained(tmp_path / "base")
    ours_targets = [t.split(".")[-1].removesuffix("_proj") for t in targets]
    if family == "gpt2":
        ours_targets = ["o", "up", "down"]
    apply_lora(ours2, LoraConfig(r=4, alpha=8, targets=ours_targets))
    _randomize_lora(ours2, seed=7)
    save_adapter(ours2, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(hf_tiny(family), tmp_path / "ours").eval()
    diff = (_logits(ours2, ids, mask) - _logits(loaded, ids, mask))[real].abs().max().item()
    assert diff <= TOL, f"lmlab -> peft: {diff:.2e}"


def test_sequence_classification_adapter_with_trained_head(tmp_path):
    """BERT + LoRA + a fully trained classifier (peft's modules_to_save), both ways."""
    config = transformers.AutoConfig.for_model(
        "bert", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    ours, _ = load_pretrained(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]))
    _randomize_lora(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)
    save_adapter(ours, tmp_path / "ours")
    base = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ids, mask = _ids()
    ours.eval()
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(theirs, ids, mask), atol=TOL, rtol=0)
    # and back: peft's saved adapter into a fresh lmlab base
    theirs.save_pretrained(tmp_path / "peft")
    again, _ = load_pretrained(tmp_path / "base")
    load_adapter(again, tmp_path / "peft")
    torch.testing.assert_close(_logits(again, ids, mask), _logits(ours, ids, mask), atol=TOL, rtol=0)


def test_merge_unmerge_and_merged_checkpoint(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=16, targets="all"))
    _randomize_lora(model)
    ids, mask = _ids()
    unmerged = _logits(model, ids, mask)
    merge_lora(model)
    changed = model.layers[0].attn.q.weight
    assert (changed - before["layers.0.attn.q.weight"]).abs().max() > 1e-3  # merging really moved the weight
    # merged = one matmul with W + BA instead of two: equal up to float rounding (logits here are O(10))
    torch.testing.assert_close(_logits(model, ids, mask), unmerged, atol=1e-4, rtol=1e-5)
    unmerge_lora(model)
    for name, p in before.items():
        assert (model.state_dict()[name] - p).abs().max() <= 1e-6, name
    save_adapter(model, tmp_path / "adapter")
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    real = mask.bool()
    diff = (_logits(merged, ids, mask) - unmerged)[real].abs().max().item()
    assert diff <= 1e-4, diff


def test_only_lora_parameters_reach_the_optimizer(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base")
    apply_lora(model, LoraConfig(r=2, targets=["q", "v"]))
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    lora = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert in_opt == lora and len(lora) == 2 * 2 * model.cfg.n_layer


def test_bad_adapter_config_names_the_field(tmp_path):
    import json

    from lmlab.errors import LmlabError

    hf_tiny("llama").save_pretrained(tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                     "target_modules": ["nope"]}))  # fmt: skip
    with pytest.raises(LmlabError, match="target_modules"):
        load_adapter(model, tmp_path / "ad")
    with pytest.raises(LmlabError, match="unknown LoRA target"):
        LoraConfig(targets=["qq"])
