"""Pretraining end to end on the bundled sample: recipe -> tokens -> Trainer -> HF checkpoint -> samples."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lmlab
from lmlab.train.config import load_recipe
from lmlab.train.pretrain import pretrain


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, request):
    from lmlab.data import tokenize_files
    from lmlab.tokenizer.train import train_tokenizer_files

    root = tmp_path_factory.mktemp("pretrain")
    sample = request.config.rootpath / "data" / "samples"
    train_tokenizer_files([sample], 600, root / "tokenizer", progress=False)
    tokenize_files(root / "tokenizer", [sample], root / "tokens", val_fraction=0.1, progress=False)
    return root


def _recipe(tokens, tmp_path, *extra):
    sets = [
        f"data.tokens={tokens / 'tokens'}", "model.preset=llama-tiny", "model.n_layer=2",
        f"train.out_dir={tmp_path / 'run'}", "train.max_steps=30", "train.micro_batch_size=8", "train.block_size=64",
        "train.lr=3e-3", "train.warmup_steps=5", "train.eval_every=10", "train.eval_batches=2", *extra,
    ]  # fmt: skip
    return load_recipe(None, sets)


def test_pretrain_learns_and_writes_a_transformers_checkpoint(tokens, tmp_path):
    summary = pretrain(_recipe(tokens, tmp_path), progress=False)
    assert summary["steps"] == 30
    evals = [r["val_loss"] for r in lmlab.train.Trainer.records(_Log(tmp_path / "run")) if "val_loss" in r]
    # it learns the sample's text: steadily below the uniform guess ln(vocab)
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and evals[-1] < math.log(600) - 0.8
    assert all("val_bpb" in r for r in lmlab.train.Trainer.records(_Log(tmp_path / "run")) if "val_loss" in r)
    assert len(summary["samples_before"]) == len(summary["samples_after"]) == 4
    final = tmp_path / "run" / "final"
    ours, tok = lmlab.load_pretrained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([tok.encode("In the beginning God created")])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (final / "recipe.yaml").exists()


class _Log:
    """Just enough of a Trainer to read a run's metrics log."""

    def __init__(self, out):
        self.log_file = out / "metrics.jsonl"


def test_pretrain_cli_with_overrides_and_a_bad_one(tokens, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  preset: llama-tiny\ndata:\n  tokens: {tokens / 'tokens'}\ntrain:\n  max_steps: 4\n")
    base = [sys.executable, "-m", "lmlab.cli", "pretrain", "--config", str(recipe)]
    sets = ["--set", f"train.out_dir={tmp_path / 'run'}", "--set", "train.block_size=32", "--set", "train.eval_every=2"]
    r = subprocess.run(base + sets, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "samples after training" in r.stdout and "best validation loss" in r.stdout
    bad = subprocess.run([*base, "--set", "train.lr=fast"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr


def test_shards_move_with_their_tokenizer(tokens, tmp_path):
    """A shards folder moved elsewhere (the tokenizer it was made with deleted) still pretrains."""
    import json
    import shutil

    moved = tmp_path / "elsewhere" / "tokens"
    shutil.copytree(tokens / "tokens", moved)
    meta = json.loads((moved / "meta.json").read_text())
    assert not Path(meta["tokenizer"]).is_absolute()
    shutil.copytree(tokens / "tokenizer", tmp_path / "tok_gone")
    shutil.rmtree(tokens / "tokenizer")
    try:
        sets = [f"data.tokens={moved}", "model.preset=llama-tiny", f"train.out_dir={tmp_path / 'run'}",
                "train.max_steps=2", "train.micro_batch_size=2", "train.block_size=16", "train.eval_every=2",
                "train.eval_batches=1"]  # fmt: skip
        summary = pretrain(load_recipe(None, sets), progress=False)
        assert summary["steps"] == 2
        # an older folder names its tokenizer by an absolute path: still read, and a clear error when gone
        meta["tokenizer"] = str(tmp_path / "tok_gone")
        (moved / "meta.json").write_text(json.dumps(meta))
        assert pretrain(load_recipe(None, sets), progress=False)["steps"] == 2
        meta["tokenizer"] = str(tmp_path / "nowhere")
        (moved / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(lmlab.LmlabError, match="nowhere"):
            pretrain(load_recipe(None, sets), progress=False)
    finally:
        shutil.copytree(tmp_path / "tok_gone", tokens / "tokenizer")
