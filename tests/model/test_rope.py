"""RoPE and its scalings against transformers' own frequency functions, plus RoPE's defining invariant."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmlab.model.config import ModelConfig
from lmlab.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq


def _hf_config(params):
    return transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=32, rope_parameters=params
    )


@pytest.mark.parametrize(
    "scaling,params",
    [
        ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        ({"type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
        (
            {
                "type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        ),
    ],
)
@pytest.mark.parametrize("seq_len", [None, 100])
def test_inv_freq_matches_transformers(scaling, params, seq_len):
    theta = 5e5
    cfg = ModelConfig(d_model=64, n_head=4, max_seq_len=32, rope_theta=theta, rope_scaling=scaling)
    fn = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    want, _ = fn(_hf_config({**params, "rope_theta": theta}), "cpu", seq_len=seq_len)
    torch.testing.assert_close(rope_inv_freq(cfg, seq_len), want, rtol=1e-6, atol=0)


def test_ntk_aware_raises_the_base():
    cfg = ModelConfig(d_model=64, n_head=4, rope_theta=1e4, rope_scaling={"type": "ntk", "factor": 4.0})
    plain = ModelConfig(d_model=64, n_head=4, rope_theta=1e4 * 4.0 ** (16 / 14))
    torch.testing.assert_close(rope_inv_freq(cfg), rope_inv_freq(plain))
    # the highest frequency is unchanged, the lowest is stretched by about the factor
    f, f0 = rope_inv_freq(cfg), rope_inv_freq(ModelConfig(d_model=64, n_head=4, rope_theta=1e4))
    assert f[0] == f0[0] and 3.0 < f0[-1] / f[-1] < 5.0


def test_scores_depend_only_on_relative_position():
    cfg = ModelConfig(d_model=64, n_head=4)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        cos, sin = rope(torch.tensor([[i, j]]), torch.float32)
        qi = apply_rope(q, cos[:, :, :1], sin[:, :, :1])
        kj = apply_rope(k, cos[:, :, 1:], sin[:, :, 1:])
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)
