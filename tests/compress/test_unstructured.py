"""Unstructured pruning: magnitude, Wanda, N:M patterns, masks kept through training, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lmlab
from lmlab.compress.magnitude import magnitude_masks
from lmlab.compress.sparsity import (
    KeepMasks,
    apply_masks,
    masks_from_scores,
    masks_from_zeros,
    prunable,
    sparsity_report,
)
from lmlab.compress.wanda import InputNorms, wanda_masks, wanda_scores
from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.train import Trainer
from tests.train.helpers import RandomTokens, config


def _model(seed: int = 0, **kw) -> lmlab.Transformer:
    torch.manual_seed(seed)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.1, **kw)).eval()


def test_wanda_scores_equal_the_formula_on_a_small_layer():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    layer.requires_grad_(False)
    x = torch.randn(3, 5, 6) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0, 0.5])  # features of very different scale
    hooks = InputNorms({"w": layer})
    layer(x[:2])
    layer(x[2:])  # two calls: the norms accumulate over every token
    hooks.remove()
    got = wanda_scores(layer.weight, hooks.norms()["w"])
    flat = x.reshape(-1, 6)
    want = torch.empty(4, 6)
    for i in range(4):
        for j in range(6):
            want[i, j] = abs(float(layer.weight[i, j].detach())) * float(torch.sqrt((flat[:, j] ** 2).sum()))
    torch.testing.assert_close(got, want)


def test_wanda_prunes_the_lowest_scores_of_each_row():
    m = _model()
    ids = torch.randint(0, 512, (2, 16))
    dense = {n: lin.weight.detach().clone() for n, lin in prunable(m).items()}
    from lmlab.compress.wanda import input_norms

    norms = input_norms(m, [ids])
    masks = wanda_masks(m, [ids], 0.5, sequential=False)
    for name, mask in masks.items():
        scores = wanda_scores(dense[name], norms[name])
        k = round(0.5 * mask.shape[1])
        assert bool(((~mask).sum(1) == k).all())  # exactly half of every row
        pruned_max = torch.where(~mask, scores, -torch.inf).max(1).values
        kept_min = torch.where(mask, scores, torch.inf).min(1).values
        assert bool((pruned_max <= kept_min).all())  # and the lower-scoring half
        assert bool((prunable(m)[name].weight[~mask] == 0).all())


def test_sequential_wanda_differs_from_one_shot_after_the_first_block():
    a, b = _model(), _model()
    ids = torch.randint(0, 512, (2, 16))
    ma, mb = wanda_masks(a, [ids], 0.5, sequential=True), wanda_masks(b, [ids], 0.5, sequential=False)
    assert all(torch.equal(ma[n], mb[n]) for n in ma if n.startswith("layers.0."))  # same inputs
    assert any(not torch.equal(ma[n], mb[n]) for n in ma if n.startswith("layers.1."))  # pruned inputs


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_hits_the_sparsity_and_drops_the_smallest(scope):
    m = _model()
    weights = {n: lin.weight.detach().abs().clone() for n, lin in prunable(m).items()}
    masks = magnitude_masks(m, 0.3, scope)
    groups = [list(masks)] if scope == "global" else [[n] for n in masks]
    for names in groups:
        pruned = torch.cat([weights[n][~masks[n]] for n in names])
        kept = torch.cat([weights[n][masks[n]] for n in names])
        assert float(pruned.max()) <= float(kept.min())
        n_all = sum(masks[n].numel() for n in names)
        assert len(pruned) == round(0.3 * n_all)


def test_global_scope_prunes_layers_unevenly():
    m = _model()
    with torch.no_grad():
        m.layers[0].mlp.up.weight.mul_(0.01)  # one layer of small weights: global pruning takes most of it
    apply_masks(m, magnitude_masks(m, 0.5, "global"))
    rows = {r["name"]: r["sparsity"] for r in sparsity_report(m)["layers"]}
    assert rows["layers.0.mlp.up.weight"] > 0.95 and rows["layers.1.mlp.up.weight"] < 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_keeps_two_of_every_four(method):
    m = _model()
    ids = torch.randint(0, 512, (2, 16))
    if method == "wanda":
        wanda_masks(m, [ids], 0.0, pattern="2:4")
    else:
        apply_masks(m, magnitude_masks(m, 0.0, pattern="2:4"))
    for layer in prunable(m).values():
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())
    assert sparsity_report(m)["sparsity"] == 0.5


def test_bad_sparsity_and_patterns_are_named():
    m = _model()
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(LmlabError, match=r"sparsity .* outside \[0, 1\)"):
            magnitude_masks(m, s)
    with pytest.raises(LmlabError, match=re.escape("2:3 does not divide layers.0.attn.q.weight's input width 64")):
        magnitude_masks(m, 0.5, pattern="2:3")
    with pytest.raises(LmlabError, match="not N:M"):
        magnitude_masks(m, 0.5, pattern="half")
    with pytest.raises(LmlabError, match="0 < N < M"):
        magnitude_masks(m, 0.5, pattern="4:4")


def test_masks_survive_fine_tuning(tmp_path):
    m = _model()
    masks = magnitude_masks(m, 0.5)
    apply_masks(m, masks)
    before = {n: lin.weight.detach().clone() for n, lin in prunable(m).items()}
    trainer = Trainer(m, RandomTokens(8), config(tmp_path, save_checkpoints=False), progress=False,
                      callbacks=[KeepMasks(masks)])  # fmt: skip
    trainer.fit()
    for name, layer in prunable(m).items():
        assert bool((layer.weight[~masks[name]] == 0).all())
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]])  # the rest trained
    # without the callback AdamW moves pruned weights off zero: the test above can fail
    m2 = _model()
    apply_masks(m2, masks)
    Trainer(m2, RandomTokens(8), config(tmp_path, save_checkpoints=False), progress=False).fit()
    assert any(bool((lin.weight[~masks[n]] != 0).any()) for n, lin in prunable(m2).items())


def test_masks_from_zeros_recover_a_pruned_checkpoints_masks():
    m = _model()
    masks = magnitude_masks(m, 0.4)
    apply_masks(m, masks)
    assert all(torch.equal(masks_from_zeros(m)[n], masks[n]) for n in masks)


def test_row_scope_prunes_each_row_equally():
    scores = {"w": torch.arange(12.0).view(3, 4)}
    mask = masks_from_scores(scores, 0.5, "row")["w"]
    assert mask.tolist() == [[False, False, True, True]] * 3
