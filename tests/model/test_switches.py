"""The architecture switches that no transformers family covers, tested by their defining behaviour,
and the KV-cache invariant (cached decode == full recompute) for every preset."""

from __future__ import annotations

import pytest
import torch

from lmlab.model.alibi import alibi_slopes
from lmlab.model.config import PRESETS, ModelConfig
from lmlab.model.transformer import Transformer, sinusoidal_table


def _model(preset: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


@pytest.mark.parametrize("n_head", [1, 4, 6, 8, 12, 16])
def test_alibi_slopes_match_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    torch.testing.assert_close(alibi_slopes(n_head), _get_alibi_slopes(n_head, "cpu").float())


def test_alibi_prefers_near_tokens(monkeypatch):
    m = _model("baichuan-tiny", n_layer=1)
    captured = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        captured["bias"] = attn_mask
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        m(torch.arange(6)[None])
    bias = captured["bias"][0, 0, 5]  # head 0, last query
    assert torch.all(bias[1:] > bias[:-1])  # the nearer the key, the larger the bias


def _changes(m, ids, at, **kwargs):
    """Which output positions change when the token at `at` changes."""
    other = ids.clone()
    other[0, at] = (other[0, at] + 1) % m.cfg.vocab_size
    with torch.no_grad():
        a, b = m(ids, **kwargs), m(other, **kwargs)
    return ((a - b).abs().amax(-1) > 1e-6)[0].tolist()


def test_causal_model_never_looks_ahead():
    m = _model("llama-tiny")
    ids = torch.randint(0, 512, (1, 8))
    assert _changes(m, ids, at=4) == [False] * 4 + [True] * 4


def test_prefix_lm_is_bidirectional_over_the_prefix_only():
    m = _model("chatglm-tiny")
    ids = torch.randint(0, 512, (1, 8))
    prefix = torch.tensor([5])
    # a prompt token influences the whole prompt, before and after it
    assert _changes(m, ids, at=3, prefix_len=prefix) == [True] * 8
    # a generated token influences only what follows
    assert _changes(m, ids, at=6, prefix_len=prefix) == [False] * 6 + [True] * 2
    # without a prefix it is a plain causal model
    assert _changes(m, ids, at=3) == [False] * 3 + [True] * 5


def test_sliding_window_limits_the_receptive_field():
    m = _model("mistral-tiny", n_layer=1, sliding_window=3)
    ids = torch.randint(0, 512, (1, 10))
    # one layer, window 3: token 2 reaches positions 2, 3, 4 only
    assert _changes(m, ids, at=2) == [False] * 2 + [True] * 3 + [False] * 5


def test_logn_scaling_acts_only_past_the_training_length():
    cfg = dict(max_seq_len=16)
    with_logn, without = _model("qwen-logn-tiny", **cfg), _model("qwen-logn-tiny", logn_attn=False, **cfg)
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        a, b = with_logn(ids), without(ids)
    # within the training length the two agree to rounding (with logn, attention runs on SDPA; without,
    # it may take lmlab's CPU kernel), past it they differ by far more
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=1e-5, atol=1e-6)
    assert (a[:, 17:] - b[:, 17:]).abs().amax() > 1e-4


def test_sinusoidal_table_formula():
    t = sinusoidal_table(50, 8)
    pos, i = 17, 2  # dims 4 and 5 hold sin and cos of pos / 10000^(4/8)
    angle = torch.tensor(pos / 10000 ** (4 / 8))
    torch.testing.assert_close(t[pos, 2 * i], torch.sin(angle))
    torch.testing.assert_close(t[pos, 2 * i + 1], torch.cos(angle))


def test_dropout_only_in_training():
    m = _model("gpt2-tiny", embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(ids), m(ids))
        m.train()
        assert not torch.equal(m(ids), m(ids))


def test_tied_embeddings_share_storage():
    m = _model("qwen2-tiny")
    assert m.lm_head.weight is m.embed.weight
    assert _model("llama-tiny").lm_head.weight is not _model("llama-tiny").embed.weight


class ConcatCache:
    """The simplest KV cache: append each step's keys and values."""

    def __init__(self, n_layer):
        self.kv, self.length, self.n_layer = {}, 0, n_layer

    def update(self, layer, k, v):
        if layer in self.kv:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        if layer == self.n_layer - 1:
            self.length = k.shape[2]
        return k, v


DECODERS = [name for name, p in PRESETS.items() if p.get("causal", True) and name.endswith("tiny")]


@pytest.mark.parametrize("preset", DECODERS)
def test_cached_decode_equals_full_recompute(preset):
    m = _model(preset, max_seq_len=64) if preset != "qwen-logn-tiny" else _model(preset, max_seq_len=8)
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    prefix = torch.tensor([6, 6]) if m.cfg.prefix_lm else None
    with torch.no_grad():
        full = m(ids, attention_mask=mask, prefix_len=prefix)
        cache = ConcatCache(m.cfg.n_layer)
        steps = [m(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache, prefix_len=prefix)]
        for t in range(6, 14):
            steps.append(m(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache, prefix_len=prefix))
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (cached - full).abs()[real].max().item() <= 1e-4
