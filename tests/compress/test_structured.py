"""Structured pruning: a physically smaller model computes what the original does with those units zeroed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lmlab
from lmlab.compress import structured
from lmlab.compress.sparsity import apply_masks
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig

PRESETS = ["llama-tiny", "qwen2-tiny", "gpt2-tiny"]


def _model(preset: str, seed: int = 0) -> lmlab.Transformer:
    torch.manual_seed(seed)
    m = lmlab.Transformer(ModelConfig.from_preset(preset, init_std=0.1))
    with torch.no_grad():  # biases start at zero: make them random so a forgotten bias would show
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def _keep(m: lmlab.Transformer, seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random, different-size choices per layer: some layers keep more groups/neurons than others."""
    g = torch.Generator().manual_seed(seed)
    groups, neurons = [], []
    for i, block in enumerate(m.layers):
        n_kv, d_ff = block.attn.n_kv_head, block.mlp.down.in_features
        groups.append(torch.randperm(n_kv, generator=g)[: max(1, n_kv - 1 - i % 2)].sort().values)
        neurons.append(torch.randperm(d_ff, generator=g)[: d_ff // (2 + i)].sort().values)
    return groups, neurons


def _zeroed(m: lmlab.Transformer, groups, neurons) -> lmlab.Transformer:
    """The original with removed heads and neurons silenced by hand: their output columns set to zero."""
    z = lmlab.Transformer(m.cfg).eval()
    z.load_state_dict(m.state_dict())
    with torch.no_grad():
        for i, block in enumerate(z.layers):
            attn, hd = block.attn, block.attn.head_dim
            per = attn.n_head // attn.n_kv_head
            for h in range(attn.n_head):
                if h // per not in groups[i].tolist():
                    attn.o.weight[:, h * hd : (h + 1) * hd] = 0
            for j in range(block.mlp.down.in_features):
                if j not in neurons[i].tolist():
                    block.mlp.down.weight[:, j] = 0
    return z


@pytest.mark.parametrize("preset", PRESETS)
def test_pruned_model_equals_original_with_units_zeroed(preset):
    m = _model(preset)
    groups, neurons = _keep(m)
    small = structured.remove_units(m, groups, neurons)
    ids = torch.randint(0, 512, (2, 12))
    assert structured.logits_match(small, _zeroed(m, groups, neurons), ids) <= 1e-5
    assert structured.logits_match(small, m, ids) > 1e-2  # it did remove something that mattered
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    assert small.cfg.layer_d_ff == [len(n) for n in neurons]


@pytest.mark.parametrize("preset", PRESETS)
def test_masked_model_equals_its_physically_pruned_twin(preset):
    m = _model(preset)
    groups, neurons = _keep(m, seed=3)
    small = structured.remove_units(m, groups, neurons)
    apply_masks(m, structured.structured_masks(m, groups, neurons))
    assert structured.logits_match(small, m, torch.randint(0, 512, (2, 12))) <= 1e-5


def test_per_layer_checkpoint_round_trips_in_lmlab_format(tmp_path):
    m = _model("llama-tiny")
    small = structured.remove_units(m, *_keep(m))
    save_pretrained(small, None, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "lmlab" and config["lmlab"]["layer_d_ff"] == small.cfg.layer_d_ff
    back, _ = load_pretrained(tmp_path / "p")
    assert structured.logits_match(back, small, torch.randint(0, 512, (1, 9))) == 0


def test_uniform_pruning_writes_what_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _model("llama-tiny")
    groups = [torch.tensor([1]), torch.tensor([0])]
    neurons = [torch.arange(0, 176, 2), torch.arange(1, 176, 2)]  # same count in each layer: uniform
    small = structured.remove_units(m, groups, neurons)
    assert small.cfg.layer_d_ff is None and small.cfg.n_kv_head == 1 and small.cfg.d_ff == 88
    save_pretrained(small, None, tmp_path / "u")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert float((hf(ids).logits - small(ids)).abs().max()) <= 1e-4


def test_kv_cache_decoding_of_a_per_layer_model_matches_full_forwards():
    m = _model("llama-tiny")
    small = structured.remove_units(m, *_keep(m))
    prompt = torch.randint(0, 512, (6,)).tolist()
    cached = generate(small, None, prompt, GenerationConfig(max_new_tokens=8))[0].token_ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole sequence each step
            seq.append(int(small(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]


def test_activation_importance_is_each_units_contribution_norm():
    m = _model("llama-tiny")
    ids = torch.randint(0, 512, (2, 8))
    scores = structured.importance(m, [ids], "neurons", "activation")
    # brute force: the norm of the change in layer 0's MLP output when neuron j alone is removed
    block = m.layers[0]
    captured = {}
    h = block.mlp.down.register_forward_pre_hook(lambda mod, a: captured.setdefault("h", a[0].detach()))
    with torch.no_grad():
        m(ids)
        h.remove()
        hid = captured["h"].reshape(-1, block.mlp.down.in_features)
        for j in (0, 17, 100):
            want = (hid[:, j : j + 1] @ block.mlp.down.weight[:, j : j + 1].T).norm()
            assert float(scores[0][j]) == pytest.approx(float(want), rel=1e-4)


def test_gradient_importance_is_the_loss_derivative_of_a_unit_gate():
    m = _model("llama-tiny")
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    scores = structured.importance(m, [ids], "neurons", "gradient")
    # central finite difference (the loss comes back rounded to float32, ~5e-7 at a loss of 6, so eps is
    # large enough for the difference to be resolved to ~0.05%; the central form's error is O(eps^2)):
    # scale neuron 5 of layer 1 by (1 +- eps) through its down column
    m64 = copy.deepcopy(m).double()
    eps, j = 1e-2, 5
    column = m64.layers[1].mlp.down.weight[:, j].clone()
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            m64.layers[1].mlp.down.weight[:, j] = column * (1 + sign * eps)
            losses.append(float(m64.loss(ids, ids)))
    want = abs(losses[0] - losses[1]) / (2 * eps)
    assert float(scores[1][j]) == pytest.approx(want, rel=2e-3, abs=1e-6)


def test_global_selection_keeps_at_least_one_unit_per_layer():
    scores = [torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0, 7.0])]
    keep = structured.select(scores, 0.6, "global")
    assert [k.tolist() for k in keep] == [[1], [1, 2]]


def test_alibi_heads_are_refused():
    m = _model("baichuan-tiny")
    with pytest.raises(LmlabError, match="ALiBi"):
        structured.remove_units(m, [torch.tensor([0])] * 2, None)
