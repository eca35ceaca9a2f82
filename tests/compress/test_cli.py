"""`lmlab prune` and `lmlab generate --draft`: results on disk, and bad input as one named line, exit 1."""

from __future__ import annotations

import json

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    save_pretrained(lmlab.Transformer(ModelConfig.from_preset("llama-tiny")), None, tmp_path / "tiny")
    return tmp_path / "tiny"


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmlab: error:")
    return err


def test_prune_writes_a_pruned_checkpoint_and_its_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_dir), str(out), "--method", "magnitude", "--pattern", "2:4"]) == 0
    info = json.loads((out / "prune.json").read_text())
    assert info["report"]["sparsity"] == 0.5
    model, _ = load_pretrained(out)
    assert float((model.layers[1].mlp.down.weight == 0).float().mean()) == 0.5
    assert "all prunable" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "1.0"], "sparsity 1.0 is outside [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity -0.2 is outside [0, 1)"),
        (["--pattern", "3:5"], "3:5 does not divide layers.0.attn.q.weight's input width 64"),
    ],
)
def test_bad_prune_input_is_one_line(tiny_dir, tmp_path, capsys, args, needle):
    assert main(["prune", str(tiny_dir), str(tmp_path / "o"), "--method", "magnitude", *args]) == 1
    assert needle in _error(capsys)


def test_a_draft_with_another_vocabulary_is_refused(smollm2_gguf, tmp_path, capsys):
    _, tokenizer = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    target = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152))
    save_pretrained(target, tokenizer, tmp_path / "target")
    save_pretrained(lmlab.Transformer(ModelConfig.from_preset("llama-tiny")), None, tmp_path / "draft")
    argv = ["generate", "--model", str(tmp_path / "target"), "--prompt", "hi", "--draft", str(tmp_path / "draft"),
            "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    capsys.readouterr()  # loading the tokenizer's checkpoint drew a progress bar
    assert main(argv) == 1
    assert "draft: the draft's vocabulary (512 tokens) is not the target's (49152)" in _error(capsys)


def test_generate_with_a_reduced_head_draft_prints_the_targets_greedy_text(smollm2_gguf, tmp_path, capsys):
    from lmlab.compress.distill import first_layers
    from lmlab.compress.draft import reduce_head

    _, tokenizer = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    target = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1))
    save_pretrained(target, tokenizer, tmp_path / "target")
    save_pretrained(reduce_head(first_layers(target, 1), list(range(0, 49152, 7))), tokenizer, tmp_path / "draft")
    base = ["generate", "--model", str(tmp_path / "target"), "--prompt", "hi there", "--max-new-tokens", "12",
            "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(base) == 0
    want = capsys.readouterr().out
    for confidence in ("0", "0.9"):
        assert main([*base, "--draft", str(tmp_path / "draft"), "--draft-confidence", confidence]) == 0
        out = capsys.readouterr()
        assert out.out == want and "drafted tokens accepted" in out.err


def test_generate_with_an_eagle_draft_prints_the_targets_greedy_text(smollm2_gguf, tmp_path, capsys):
    from lmlab.compress.draft import reduce_head
    from lmlab.compress.eagle import eagle_draft

    _, tokenizer = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    target = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1))
    save_pretrained(target, tokenizer, tmp_path / "target")
    save_pretrained(reduce_head(eagle_draft(target), list(range(0, 49152, 7))), tokenizer, tmp_path / "draft")
    base = ["generate", "--model", str(tmp_path / "target"), "--prompt", "hi there", "--max-new-tokens", "12",
            "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(base) == 0
    want = capsys.readouterr().out
    assert main([*base, "--draft", str(tmp_path / "draft")]) == 0
    out = capsys.readouterr()
    assert out.out == want and "drafted tokens accepted" in out.err
