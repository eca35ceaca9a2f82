"""The logit lens: its last row is the model's logits; each row equals a hand-run of the first blocks."""

from __future__ import annotations

import copy

import pytest
import torch

import lmlab
from lmlab.errors import LmlabError
from lmlab.viz.lens import format_lens, inspect_lens, lens_tables, logit_lens
from lmlab.viz.tokens import label
from tests.viz.conftest import spread


def test_rows_equal_a_hand_computation_on_tiny_llama():
    cfg = lmlab.ModelConfig.from_preset("llama-tiny")
    model = spread(lmlab.Transformer(cfg), std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    lens = logit_lens(model, ids)
    assert lens.shape == (cfg.n_layer + 1, 2, 9, cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(lens[-1], model(ids))  # the last layer is the model's own prediction
        x = model.embed(ids)  # by hand: embeddings, then block after block, each read through norm + head
        rope = model.rope(torch.arange(9).expand(2, 9), x.dtype)
        want = [model.lm_head(model.norm(x))]
        for block in model.layers:
            x = block(x, rope=rope, is_causal=True)
            want.append(model.lm_head(model.norm(x)))
    for layer, w in enumerate(want):
        assert (lens[layer] - w).abs().max() <= 1e-5, f"row {layer}"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "baichuan-tiny", "bert-tiny"])
def test_row_i_is_the_model_cut_after_i_blocks(preset):
    """Learned positions, ALiBi, and a post-norm MLM encoder (no final norm): row i = the first i blocks."""
    model = spread(lmlab.Transformer(lmlab.ModelConfig.from_preset(preset)), std=0.1)
    ids = torch.randint(0, 512, (1, 7))
    lens = logit_lens(model, ids)
    for i in range(model.cfg.n_layer + 1):
        cut = copy.deepcopy(model)
        cut.layers = cut.layers[:i]
        with torch.no_grad():
            assert (lens[i] - cut(ids)).abs().max() <= 1e-5, f"row {i}"


def test_tables_and_files(tmp_path):
    from lmlab.tokenizer.train import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. 猫坐在垫子上。"] * 20, vocab_size=280, progress=False)
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", vocab_size=300)
    model = spread(lmlab.Transformer(cfg), std=0.1)
    ids = torch.tensor([tok.encode("the cat sat")])
    tokens = [label(tok.decode([i])) for i in ids[0].tolist()]
    r = inspect_lens(model, tok, ids, tokens, tmp_path, data="test", k=3)
    T = ids.shape[1]
    assert len(r["top"]) == 3 and len(r["top"][0]) == T and len(r["top"][0][0]) == 3
    logits = logit_lens(model, ids)[:, 0]
    probs = logits.softmax(-1)
    for layer in range(3):
        for t in range(T - 1):  # the correct token is the next one
            assert r["correct_prob"][layer][t] == pytest.approx(float(probs[layer, t, ids[0, t + 1]]), abs=1e-6)
        assert r["top"][layer][0][0]["id"] == int(probs[layer, 0].argmax())
    assert (tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "lens.json").exists()
    assert len(r["table"].splitlines()) == 2 + 3
    tables = lens_tables(logits, ids[0], causal=True, k=2)
    assert tables["correct"].shape == (3, T - 1)
    assert "0." in format_lens(tables, tokens, [["x"] * T] * 3)


def test_lens_of_smollm2_ends_at_its_logits(smollm2_pair, smollm2_reference):
    ours, _, theirs = smollm2_pair
    ids, want = smollm2_reference
    rows = [0, 10, 20, 30]  # of 31: each row is a 49152-way projection
    lens = logit_lens(ours, ids, rows=rows)
    assert (lens[-1] - want.logits).abs().max() <= 1e-4  # the model's logits (bit-equal: the tiny test above)
    # transformers' hidden_states: the embeddings, then each layer's output (the last one after the final norm)
    for row, i in enumerate(rows[:-1]):
        with torch.no_grad():
            mid = theirs.lm_head(theirs.model.norm(want.hidden_states[i]))
        assert (lens[row] - mid).abs().max() <= 1e-4, f"row {i}"


def test_a_model_without_lm_head_is_one_line():
    model = lmlab.Transformer(lmlab.ModelConfig.from_preset("llama-tiny", head="seq_cls", num_labels=2))
    with pytest.raises(LmlabError, match="needs a model with an LM head"):
        logit_lens(model, torch.zeros(1, 3, dtype=torch.long))
