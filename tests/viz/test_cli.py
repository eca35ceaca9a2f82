"""`lmlab inspect ...` end to end on a tiny checkpoint with a real tokenizer, and its one-line errors."""

from __future__ import annotations

import json

import pytest

import lmlab
from lmlab.cli import main
from tests.viz.conftest import spread

TEXT = "the cat sat on the mat. 猫坐在垫子上。"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lmlab.tokenizer.train import train_tokenizer

    tok = train_tokenizer([TEXT] * 20, vocab_size=280, progress=False)
    cfg = lmlab.ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=32)
    return lmlab.save_pretrained(spread(lmlab.Transformer(cfg), std=0.1), tok, tmp_path_factory.mktemp("tiny"))


def test_attention_and_lens_commands(tiny_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "attention", "--model", str(tiny_dir), "--text", TEXT, "--out", str(out),
                 "--layers", "1", "--heads", "0,3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "entropy" in printed and "1 heatmaps" in printed
    assert json.loads((out / "attention.json").read_text())["layers"] == [1]
    assert main(["inspect", "lens", "--model", str(tiny_dir), "--text", TEXT, "--out", str(out)]) == 0
    assert "emb" in capsys.readouterr().out and (out / "lens.png").exists()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layers", "2"], "layers: layer 2 is out of range: the model has 2 layers (0-1)"),
        (["--heads", "1,4"], "heads: head 4 is out of range: the model has 4 heads (0-3)"),
        (["--text", "the cat " * 40], "text: the text is 81 tokens, longer than the model's context of 32 tokens"),
    ],
)
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, flags, message):
    args = {"--text": TEXT, **dict(zip(flags[::2], flags[1::2]))}
    argv = ["inspect", "attention", "--model", str(tiny_dir), "--out", str(tmp_path)]
    assert main(argv + [x for kv in args.items() for x in kv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
