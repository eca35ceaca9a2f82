"""`lmlab finetune` end to end on tiny models: classification (full and LoRA + merge), NER, SFT resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from lmlab.cli import main
from lmlab.finetune.lora import load_adapter
from lmlab.finetune.run import finetune, finetune_config, load_records, predict
from lmlab.model import load_pretrained
from lmlab.train.config import load_recipe
from tests.finetune.conftest import write_jsonl


def _recipe(tmp_path, base, data, pooling="mean", **finetune):
    ft = {"task": "classification", "method": "full", "epochs": 4, "max_len": 16, **finetune}
    recipe = {
        # mean pooling learns this bag-of-cues task in few steps; BERT's own pooler needs about twice as many
        "model": {"init_from": str(base), "cls_pooling": pooling},
        "finetune": ft,
        "data": {k: str(data / f"{k}.jsonl") for k in ("train", "validation", "test")},
        "train": {"out_dir": str(tmp_path / "out"), "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 24, "eval_batches": 100, "early_stopping_metric": "val_macro_f1", "log_every": 4,
                  "weight_decay": 0.0},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_classification_learns_and_writes_a_transformers_checkpoint(tmp_path, tiny_bert, sentiment_data, capsys):
    path = _recipe(tmp_path, tiny_bert, sentiment_data, pooling="pooler", epochs=8, label_noise_threshold=0.5)
    assert main(["finetune", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test (n=96): accuracy" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["test"]["accuracy"] > 0.8  # chance is 0.5 (the majority class); the cue word decides
    assert summary["after"]["val_macro_f1"] > summary["train"]["best_value"] - 1e-9
    assert (tmp_path / "out" / "test_confusion.png").stat().st_size > 0
    # the final directory is a BertForSequenceClassification that transformers loads with our labels
    final = tmp_path / "out" / "final"
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert theirs.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ours, tok = load_pretrained(final)
    enc = tok.encode("the movie was great")
    ids = torch.tensor([enc])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_lora_classification_adapter_merges_to_the_same_predictions(tmp_path, tiny_bert, sentiment_data):
    path = _recipe(tmp_path, tiny_bert, sentiment_data, method="lora", lora={"r": 4, "alpha": 8, "targets": "all"},
                   epochs=8)  # fmt: skip
    recipe = load_recipe(path, ["train.lr=1e-2"])  # a frozen random trunk: the adapter does all the work
    summary = finetune(recipe, progress=False)
    final = tmp_path / "out" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 5
    assert main(["merge", str(tiny_bert), str(final), str(tmp_path / "merged")]) == 0
    merged, tok = load_pretrained(tmp_path / "merged")
    head = json.loads((final / "head.json").read_text())  # the head the adapter was trained with
    assert head["num_labels"] == 3 and head["cls_pooling"] == "mean"
    base, _ = load_pretrained(tiny_bert, **head)
    load_adapter(base, final)
    ft = finetune_config(recipe)
    from lmlab.finetune.task_data import ClassificationDataset, LabelMap

    test = load_records(recipe, ft, "test")
    ds = ClassificationDataset(tok, test, LabelMap(["negative", "neutral", "positive"]), 32, max_len=16)
    _, pred_adapter, p1 = predict(base, ds)
    _, pred_merged, p2 = predict(merged, ds)
    assert pred_adapter == pred_merged
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    assert np.mean(np.array(pred_merged) == ds.labels) > 0.8  # LoRA learned too (chance 0.5)


def test_ner_reports_entity_f1_on_words(tmp_path, tiny_bert):
    rows = []
    rng = np.random.default_rng(0)
    names, places = ["alice", "bob", "carol"], ["paris", "rome", "oslo"]
    for _ in range(160):
        a, b = rng.choice(names), rng.choice(places)
        rows.append({"tokens": [a, "went", "to", b, "today"], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "ner" / f"{split}.jsonl", rows if split == "train" else rows[:32])
    path = _recipe(tmp_path, tiny_bert, tmp_path / "ner", task="ner", epochs=4)
    recipe = load_recipe(path, ["train.early_stopping_metric=val_entity_f1", "train.micro_batch_size=16"])
    summary = finetune(recipe, progress=False)
    assert summary["test"]["f1"] > 0.9
    assert set(summary["test"]["per_type"]) == {"PER", "LOC"}


def _sft_recipe(tmp_path, base, data, out, steps):
    recipe = {
        "model": {"init_from": str(base)},
        "finetune": {"task": "sft", "method": "lora", "lora": {"r": 4, "targets": ["q", "v", "down"]},
                     "adversarial": None},
        "data": {"train": str(data), "validation": str(data)},
        "train": {"out_dir": str(out), "block_size": 64, "micro_batch_size": 2, "grad_accum": 2, "max_steps": steps,
                  "lr": 1e-2, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2, "log_every": 1,
                  "checkpoint_every": 3},
    }  # fmt: skip
    import yaml

    path = tmp_path / f"sft-{steps}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def test_lora_sft_resume_is_exact(tmp_path, tiny_chat_llama):
    convs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", convs)
    full = finetune(_sft_recipe(tmp_path, tiny_chat_llama, data, tmp_path / "a", 6), progress=False)
    assert full["after"]["val_loss"] < full["before"]["val_loss"]
    # the same run "crashes" at step 5 (after the step-3 checkpoint), then resumes to the end

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        finetune(_sft_recipe(tmp_path, tiny_chat_llama, data, tmp_path / "b", 6), progress=False, on_eval=crash)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000003"]
    resumed = finetune(_sft_recipe(tmp_path, tiny_chat_llama, data, tmp_path / "b", 6), resume=True, progress=False)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["train"]["steps"] == 6


def test_bad_recipe_is_one_clear_line(tmp_path, tiny_bert, sentiment_data, capsys):
    path = _recipe(tmp_path, tiny_bert, sentiment_data, method="lorra")
    assert main(["finetune", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "finetune.method" in err and "Traceback" not in err
    bad = write_jsonl(tmp_path / "bad" / "train.jsonl", [{"text": "x"}])
    path = _recipe(tmp_path, tiny_bert, bad.parent)
    assert main(["finetune", "--config", str(path)]) == 1
    assert "train.jsonl:1: label" in capsys.readouterr().err


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_cli_writes_normalized_vectors(tmp_path, minilm_dir, pooling):
    from lmlab.finetune.embed import embed

    texts = tmp_path / "texts.txt"
    texts.write_text("a cat sat on the mat\n今天天气很好\n\nthe stock market fell\n", encoding="utf-8")
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(minilm_dir), "--input", str(texts), "--out", str(out),
                 "--pooling", pooling]) == 0  # fmt: skip
    vectors = np.load(out)
    model, tok = load_pretrained(minilm_dir)
    want = embed(model, tok, ["a cat sat on the mat", "今天天气很好", "the stock market fell"], pooling=pooling)
    np.testing.assert_allclose(vectors, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_continued_pretraining_on_domain_text(tmp_path, tiny_chat_llama):
    """task lm: every token of plain documents is a target; the domain's held-out loss falls."""
    import yaml

    rng = np.random.default_rng(0)
    words = ["thou", "shalt", "the", "lord", "said", "unto", "him", "and", "behold", "israel"]
    docs = [{"text": " ".join(rng.choice(words[:5] if i % 2 else words[5:], 12))} for i in range(64)]
    write_jsonl(tmp_path / "d" / "train.jsonl", docs)
    write_jsonl(tmp_path / "d" / "validation.jsonl", docs[:8])
    recipe = {
        "model": {"init_from": str(tiny_chat_llama)},
        "finetune": {"task": "lm", "method": "full", "epochs": 3},
        "data": {"train": str(tmp_path / "d" / "train.jsonl"), "validation": str(tmp_path / "d" / "validation.jsonl")},
        "train": {"out_dir": str(tmp_path / "out"), "block_size": 32, "micro_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "eval_every": 10, "log_every": 5},
    }  # fmt: skip
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(recipe))
    summary = finetune(load_recipe(tmp_path / "lm.yaml"), progress=False)
    assert summary["data"]["assistant_tokens"] == summary["data"]["tokens"] - summary["data"]["examples"]
    assert summary["after"]["val_loss"] < 0.7 * summary["before"]["val_loss"]
    model, _ = load_pretrained(tmp_path / "out" / "final")  # a plain causal LM checkpoint
    assert model.cfg.head == "lm"
