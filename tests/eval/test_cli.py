"""`lmlab eval` end to end on a tiny model: ppl + a custom YAML task, results.json, report.md, compare."""

from __future__ import annotations

import json

import yaml

from lmlab.cli import main
from lmlab.eval.tasks import TASK_DIR
from tests.eval.test_multiple_choice import DOCS


def test_eval_cli_writes_results_and_compares(tiny_pair, tmp_path, capsys):
    _, _, _, model_dir = tiny_pair
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    spec = yaml.safe_load((TASK_DIR / "mmlu.yaml").read_text())
    spec.update(name="quiz", dataset="docs.jsonl")  # a relative dataset path is read next to the task file
    (tmp_path / "quiz.yaml").write_text(yaml.safe_dump(spec))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    for out in ("a", "b"):
        argv = ["eval", "--model", str(model_dir), "--tasks", f"ppl,{tmp_path / 'quiz.yaml'}", "--data", str(text)]
        assert main([*argv, "--max-length", "64", "--stride", "32", "--limit", "3", "--out", str(tmp_path / out)]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["model_hash"] and len(results["tasks"]["quiz"]["records"]) == 3
    assert results["tasks"]["ppl"]["perplexity"] > 1 and results["tasks"]["ppl"]["nll_per_token_se"] >= 0
    assert "| quiz | acc |" in (tmp_path / "a" / "report.md").read_text()
    assert (tmp_path / "a" / "confusion-quiz.png").exists() and (tmp_path / "a" / "reliability-quiz.png").exists()
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| quiz | acc |" in capsys.readouterr().out  # same model twice: difference 0


def test_eval_cli_errors_are_one_line(tiny_pair, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_pair[3]), "--tasks", "ppl"]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["eval", "--tasks", "mmlu"]) == 1
    assert main(["eval", "compare", str(tmp_path / "nope")]) == 1


def test_model_tokenizer_mismatch_names_field(tiny_pair):
    import types

    import pytest

    from lmlab.errors import LmlabError
    from lmlab.eval.harness import check_tokenizer

    with pytest.raises(LmlabError) as e:
        check_tokenizer(tiny_pair[0], types.SimpleNamespace(vocab_size=50_000), "ckpt")
    assert e.value.field == "vocab_size" and e.value.file == "ckpt"
    with pytest.raises(LmlabError, match="no tokenizer"):
        check_tokenizer(tiny_pair[0], None, "ckpt")


def test_eval_cli_generation_task_end_to_end(tiny_pair, tmp_path, capsys):
    from tests.eval.test_generation import write_task

    task_file = write_task(tmp_path, group_by="kind")
    for out in ("a", "b"):
        argv = ["eval", "--model", str(tiny_pair[3]), "--tasks", str(task_file), "--limit", "4", "--batch-size", "3"]
        assert main([*argv, "--out", str(tmp_path / out)]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    qa = results["tasks"]["qa"]
    assert qa["output_type"] == "generate_until" and len(qa["records"]) == 4 and qa["chrf_se"] >= 0
    assert {"input", "prompt", "prediction", "references", "bleu", "rougeL", "finish_reason"} <= set(qa["records"][0])
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| qa | bleu |" in report and "## qa: first 4 examples" in report
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| qa | bleu |" in out and "| qa | exact_match |" in out  # greedy is deterministic: B - A is 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["tasks"]["qa"]["records"] == qa["records"]


def test_eval_cli_reports_progress(tiny_pair, tmp_path, monkeypatch, capsys):
    """`lmlab eval` (and the demo's evaluation stage) is never silent: each task shows its progress."""
    monkeypatch.setenv("LMLAB_PROGRESS_INTERVAL", "0")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    argv = ["eval", "--model", str(tiny_pair[3]), "--tasks", "ppl", "--data", str(text), "--max-length", "64"]
    assert main([*argv, "--stride", "32", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "perplexity" in err and "it/s" in err and "\r" not in err
