"""Embedding maps: PCA equal to scikit-learn's, labelled files read strictly, one panel per model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmlab
from lmlab.errors import LmlabError
from lmlab.viz.embeddings import embedding_map, pca, read_labelled, separation


@pytest.mark.parametrize("shape", [(50, 8), (7, 20)])  # more rows than dimensions, and fewer
def test_pca_equals_scikit_learn(shape):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * np.linspace(3, 0.5, shape[1])  # distinct variances: a well-defined basis
    ours, ratio, comps = pca(x, k=3)
    ref = PCA(n_components=3, svd_solver="full").fit(x)
    want = ref.transform(x)
    signs = np.sign((ours.numpy() * want).sum(0))  # the sign of a component is arbitrary; compare up to it
    assert np.abs(ours.numpy() * signs - want).max() <= 1e-9
    assert np.abs(comps.numpy() * signs[:, None] - ref.components_).max() <= 1e-9
    assert np.abs(ratio.numpy() - ref.explained_variance_ratio_).max() <= 1e-12
    assert (comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all()  # our sign rule, deterministic


def test_separation():
    xy = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    assert separation(xy, ["a", "a", "b", "b"]) == pytest.approx(100 / 101)
    assert separation(xy, ["a", "b", "a", "b"]) == pytest.approx(1 / 101)


def _rows(n: int):
    words = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "poor"], "中性": ["桌子", "窗户"]}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = list(words)[i % 3]
        rows.append({"text": f"the film was {rng.choice(words[label])} today", "stars": label})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_map_of_two_models(tmp_path):
    from lmlab.tokenizer.train import train_tokenizer

    data = _write(tmp_path / "data.jsonl", _rows(30))
    tok = train_tokenizer([r["text"] for r in _rows(30)], vocab_size=300, progress=False)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = lmlab.Transformer(lmlab.ModelConfig.from_preset("bert-tiny", vocab_size=320, head="none"))
        dirs.append(str(lmlab.save_pretrained(model, tok, tmp_path / f"m{seed}")))
    result = embedding_map(dirs, data, "stars", tmp_path / "out", limit=24)
    assert result["n"] == 24 and result["labels"] == ["neg", "pos", "中性"]
    assert [m["model"] for m in result["models"]] == dirs
    for m in result["models"]:
        assert 0 <= m["separation_pca"] <= 1 and sum(m["explained_variance"]) <= 1 + 1e-9
    assert (tmp_path / "out" / "embeddings-pca.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "embeddings.json").read_text())["n"] == 24


def test_bad_files_name_the_line(tmp_path):
    rows = _rows(4)
    del rows[2]["stars"]
    with pytest.raises(LmlabError, match=r"data.jsonl:3: stars: missing field"):
        read_labelled(_write(tmp_path / "data.jsonl", rows), "stars")
    texts, labels = read_labelled(_write(tmp_path / "ok.jsonl", _rows(9)), "stars", limit=4, seed=1)
    assert len(texts) == len(labels) == 4
