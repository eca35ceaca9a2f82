"""Round trips through lmlab's own writer, and the loss against transformers'."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import lmlab
from tests.conftest import hf_tiny


@pytest.mark.parametrize("preset", ["baichuan-tiny", "chatglm-tiny", "qwen-logn-tiny"])
def test_switches_without_a_transformers_family_roundtrip_as_lmlab(preset, tmp_path):
    torch.manual_seed(0)
    model = lmlab.Transformer(lmlab.ModelConfig.from_preset(preset)).eval()
    lmlab.save_pretrained(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmlab"
    again, _ = lmlab.load_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert again.cfg.to_dict() == {**model.cfg.to_dict(), "extra": {}}


def test_a_changed_switch_is_not_written_as_its_family(tmp_path):
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", pos="alibi")
    lmlab.save_pretrained(lmlab.Transformer(cfg), None, tmp_path / "alibi")
    assert json.loads((tmp_path / "alibi" / "config.json").read_text())["model_type"] == "lmlab"
    lmlab.save_pretrained(lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny")), None, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_loss_matches_transformers(model_type, tmp_path):
    hf = hf_tiny(model_type)
    hf.save_pretrained(tmp_path)
    ours, _ = lmlab.load_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours.loss(ids, labels), hf(ids, labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_bert_mlm_loss_matches_transformers(tmp_path):
    hf = hf_tiny("bert")
    hf.save_pretrained(tmp_path)
    ours, _ = lmlab.load_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    ids[:, 3] = 4  # the "masked" position
    with torch.no_grad():
        want = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()(ids, labels=labels).loss
        torch.testing.assert_close(ours.loss(ids, labels), want, rtol=1e-5, atol=1e-5)
