"""Attention weights: equal to transformers' eager weights, exact for every preset, masks respected."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import lmlab
from lmlab.errors import LmlabError
from lmlab.model.config import PRESETS
from lmlab.viz.attention import attention_weights, head_summary, inspect_attention, parse_indices
from tests.conftest import hf_tiny
from tests.viz.conftest import spread

TOL = 1e-5


def _left_padded(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_weights_equal_transformers_eager_on_tiny_llama(kv_heads, tmp_path):
    hf = hf_tiny("llama", num_key_value_heads=kv_heads, attn_implementation="eager")
    hf.save_pretrained(tmp_path)
    ours, _ = lmlab.load_pretrained(tmp_path)
    ids, mask = _left_padded(hf.config.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers counts positions from the padding
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    got = attention_weights(ours, ids, attention_mask=mask)
    real = mask.bool()
    for i, w in got.items():
        assert w.shape == (3, 4, 10, 10)
        diff = (w - want[i]).abs().permute(0, 2, 1, 3)[real]  # real query rows (padding rows are arbitrary)
        assert diff.max() <= TOL, f"layer {i}: max |diff| {diff.max():.2e}"


def test_weights_equal_transformers_eager_on_smollm2(smollm2_pair, smollm2_reference):
    ours = smollm2_pair[0]
    ids, reference = smollm2_reference
    want = reference.attentions
    got = attention_weights(ours, ids)
    assert len(got) == len(want) == 30
    worst = max((got[i] - want[i]).abs().max().item() for i in got)
    assert worst <= TOL, f"max |diff| {worst:.2e}"


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.endswith("-tiny")])
def test_weights_reproduce_the_forward_pass_for_every_preset(preset):
    """weights @ v through the output projection equals the layer's real (fused-kernel) output: GQA, ALiBi,
    sliding window, prefix-LM, log-n scaling and encoders included, with padding."""
    T = 40  # past qwen-logn-tiny's max_seq_len (32), where log-n scaling starts
    overrides = {"sliding_window": 5} if preset == "mistral-tiny" else {}
    cfg = lmlab.ModelConfig.from_preset(preset, **overrides)
    if cfg.pos == "learned":
        cfg.max_seq_len = max(cfg.max_seq_len, T)
    model = spread(lmlab.Transformer(cfg), std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    mask = torch.ones_like(ids)
    mask[1, T - 7 :] = 0  # right padding
    kwargs = {"attention_mask": mask}
    if cfg.prefix_lm:
        kwargs["prefix_len"] = torch.tensor([6, 9])
    inputs, outputs = {}, {}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
        hooks.append(block.attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    weights = attention_weights(model, ids, **kwargs)
    for h in hooks:
        h.remove()
    real = mask.bool()
    for i, w in weights.items():
        attn, x = model.layers[i].attn, inputs[i]
        v = attn.v(x).view(2, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        y = attn.o((w @ v).transpose(1, 2).reshape(2, T, -1))
        scale = outputs[i].abs().max()
        assert ((y - outputs[i]).abs()[real].max() / scale) <= TOL, f"layer {i}"
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=TOL)  # every row is a distribution
        assert (w[1][..., ~real[1]][:, real[1]] == 0).all()  # real queries never see padding keys
        rows = lambda t: t.permute(0, 2, 1, 3)[real]  # (real queries, H, T): padding queries see everything
        if cfg.causal and not cfg.prefix_lm:
            assert (rows(w.triu(1)) == 0).all()  # nor the future
        if preset == "mistral-tiny":
            assert (rows(w.tril(-5)) == 0).all()  # nor past the window


def test_summary_and_files(tmp_path):
    cfg = lmlab.ModelConfig.from_preset("llama-tiny")
    model = spread(lmlab.Transformer(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    tokens = [f"t{i}" for i in range(6)]
    result = inspect_attention(model, ids, tokens, tmp_path, layers="1", heads="0,2-3", data="test")
    with safe_open(str(tmp_path / "attention.safetensors"), "pt") as f:
        assert list(f.keys()) == ["layer.1"]
        w = f.get_tensor("layer.1")
        assert w.shape == (4, 6, 6) and w.dtype == torch.float32
    assert torch.equal(w, attention_weights(model, ids, [1])[1][0])
    assert result["heads"] == [0, 2, 3] and [s["head"] for s in result["summary"][1]] == [0, 2, 3]
    assert (tmp_path / "attention-layer01.png").read_bytes()[:4] == b"\x89PNG"
    # summary figures on hand-made weights: a sink head and a previous-token head
    T = 5
    sink = torch.zeros(T, T)
    sink[:, 0] = 1
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1
    s0, s1 = head_summary(torch.stack([sink, prev]))
    assert s0["first_token"] == 1 and s0["entropy"] == 0 and s0["distance"] == pytest.approx(2.0)
    assert s1["first_token"] == pytest.approx(0.25) and s1["distance"] == pytest.approx(0.8)


def test_bad_indices_name_themselves():
    assert parse_indices("0, 2-3", 4, "heads") == [0, 2, 3]
    with pytest.raises(LmlabError, match=r"^layers: layer 7 is out of range: the model has 2 layers \(0-1\)"):
        parse_indices("7", 2, "layers")
    with pytest.raises(LmlabError, match="heads: head -1 is out of range"):
        parse_indices("-1", 4, "heads")
    with pytest.raises(LmlabError, match="'x' is not an index"):
        parse_indices("x", 4, "heads")
