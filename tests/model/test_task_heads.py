"""Classification heads vs transformers' *ForSequenceClassification / *ForTokenClassification (fp32, <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers

import lmlab
from lmlab.model.checkpoint import load_pretrained
from tests.conftest import hf_tiny
from tests.model.test_hf_parity import _batch as _padded_batch

TOL = 1e-4
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert")
LABELS = ["neg", "neu", "pos"]


def _hf_task_model(family: str, head: str):
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}, pad_token_id=0)
    return hf_tiny(family, task=head, **labels)


def _compare(ours, theirs, head, padding_side):
    ids, mask = _padded_batch(128, padding_side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers counts left padding as positions otherwise
    kwargs = {} if isinstance(theirs, (transformers.BertPreTrainedModel,)) else {"position_ids": positions}
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(input_ids=ids, attention_mask=mask, **kwargs).logits
    assert got.shape == want.shape
    if head == "token_cls":
        got, want = got[mask.bool()], want[mask.bool()]
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max |diff| {diff:.2e}"


@pytest.mark.parametrize("head", ["seq_cls", "token_cls"])
@pytest.mark.parametrize("family", FAMILIES)
def test_task_head_parity_both_ways(family, head, tmp_path):
    padding = "right" if family == "bert" else "left"
    theirs = _hf_task_model(family, head)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = load_pretrained(tmp_path / "hf")
    assert ours.cfg.head == head and ours.cfg.labels == LABELS
    _compare(ours, theirs, head, padding)
    _compare(ours, theirs, head, "right")
    # ours -> transformers: the directory we write loads as the same task model with the same labels
    lmlab.save_pretrained(ours, None, tmp_path / "ours")
    cls = (
        transformers.AutoModelForSequenceClassification
        if head == "seq_cls"
        else transformers.AutoModelForTokenClassification
    )
    back = cls.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(theirs)
    assert back.config.id2label == theirs.config.id2label
    _compare(ours, back, head, padding)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_new_head_on_a_pretrained_trunk(family, tmp_path):
    """Loading a base checkpoint with head=seq_cls keeps every trunk weight and adds a fresh classifier."""
    base = hf_tiny(family)
    base.save_pretrained(tmp_path / "base")
    lm, _ = load_pretrained(tmp_path / "base")
    clf, _ = load_pretrained(tmp_path / "base", head="seq_cls", num_labels=3, labels=LABELS)
    trunk = {n: p for n, p in lm.state_dict().items() if not n.startswith(("lm_head", "mlm_head", "pooler"))}
    for name, p in trunk.items():
        assert torch.equal(clf.state_dict()[name], p), name
    assert clf.classifier.weight.shape == (3, 64)
    assert clf.classifier.weight.std() > 0  # a fresh random init, not zeros
    ids, mask = _padded_batch(128, "right")
    with torch.no_grad():
        h = lm.hidden_states(ids, attention_mask=mask)
        logits = clf(ids, attention_mask=mask)
    pooled = clf.pool(h) if family == "bert" else h[torch.arange(3), mask.sum(1) - 1]
    torch.testing.assert_close(logits, clf.classifier(pooled), atol=1e-5, rtol=0)


def test_pooling_modes_and_config_errors():
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", head="seq_cls", num_labels=2, cls_pooling="mean")
    model = lmlab.Transformer(cfg).eval()
    ids, mask = _padded_batch(128, "right")
    with torch.no_grad():
        h = model.hidden_states(ids, attention_mask=mask)
        want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(model(ids, attention_mask=mask), model.classifier(want), atol=1e-6, rtol=0)
    with pytest.raises(lmlab.LmlabError, match="num_labels"):
        lmlab.ModelConfig.from_preset("llama-tiny", head="token_cls")
    with pytest.raises(lmlab.LmlabError, match="label names"):
        lmlab.ModelConfig.from_preset("llama-tiny", head="seq_cls", num_labels=2, labels=["a"])
