"""`lmlab align` end to end on tiny models: outputs, exact resume after a crash, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lmlab.align.run import align
from lmlab.cli import main
from lmlab.model.checkpoint import load_pretrained
from lmlab.train.config import load_recipe
from tests.align.conftest import write_jsonl

TRAIN = dict(max_steps=4, micro_batch_size=4, block_size=64, lr=5e-3, warmup_steps=0, eval_every=2, log_every=1,
             eval_batches=1, checkpoint_every=4)  # fmt: skip
DATA = {"dataset": "arithmetic-easy", "train_size": 24, "validation_size": 4}


def _recipe(tmp_path, base, method, name=None, **align):
    spec = {"model": {"init_from": str(base)}, "data": dict(DATA),
            "train": {**TRAIN, "out_dir": str(tmp_path / (name or method))},
            "align": {"method": method, "eval_prompts": 2, "eval_max_new_tokens": 4, "max_new_tokens": 6, **align}}  # fmt: skip
    path = tmp_path / f"{name or method}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# a key of the loss on every row; rollout keys (PPO's score) on the rows after a rollout
KEYS = {"rm": "accuracy", "dpo": "reward_margin", "grpo": "reward/answer_correct", "ppo": "policy_loss"}


@pytest.mark.parametrize("method", ["rm", "dpo", "grpo", "ppo"])
def test_each_method_writes_metrics_and_a_loadable_model(method, tmp_path, tiny_chat_llama, tiny_rm, capsys):
    extra = {"num_generations": 2, "reward_funcs": ["answer_correct", "format"]} if method == "grpo" else {}
    if method == "ppo":
        extra = {"reward_model": str(tiny_rm), "minibatches": 2, "epochs": 2, "kl_target": 1.0}
    if method == "dpo":
        extra = {"lora": {"r": 4, "alpha": 8}}
    assert main(["align", method, "--config", str(_recipe(tmp_path, tiny_chat_llama, method, **extra))]) == 0
    out = tmp_path / method
    train_rows = [r for r in _rows(out) if "lr" in r]
    assert all("step" in r and "loss" in r for r in train_rows) and len(train_rows) == 4
    assert all(KEYS[method] in r for r in train_rows)
    if method == "ppo":  # 2 minibatches x 2 epochs per rollout: rollouts at steps 1 and 5
        assert "score" in train_rows[0] and "kl" in train_rows[0] and "kl_coef" in train_rows[0]
    assert (out / "align_curves.png").exists() and (out / "summary.json").exists()
    if method == "dpo":  # a LoRA run: the adapter loads in peft on the transformers base
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
        tuned = peft.PeftModel.from_pretrained(base, out / "final")
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())
    else:
        model, _ = load_pretrained(out / "final")
        assert model.cfg.head == ("seq_cls" if method == "rm" else "lm")
    summary = json.loads((out / "summary.json").read_text())
    for key in {"grpo": ["pass_rate"], "ppo": ["rm_score"]}.get(method, []):  # paired before/after, same prompts
        c = summary["change"][key]
        assert c["a"] == pytest.approx(summary["before"][key]) and c["b"] == pytest.approx(summary["after"][key])
    if method == "grpo":
        sample = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
        assert set(sample) >= {"step", "prompt", "completion", "rewards"}
    assert "method: " + method in capsys.readouterr().out


class Killed(Exception):
    pass


def test_resume_after_a_crash_is_exact(tmp_path, tiny_chat_llama, monkeypatch):
    """GRPO (2 updates per rollout, a KL reference) crashes after step 3's checkpoint, mid-rollout; resuming gives
    the same weights and the same losses as the run that never stopped."""
    from lmlab.train.trainer import Trainer

    method, extra = "grpo", {"num_generations": 2, "epochs": 2, "beta": 0.05}
    TRAIN["checkpoint_every"] = 1
    try:
        full = align(load_recipe(_recipe(tmp_path, tiny_chat_llama, method, "full", **extra)), progress=False)
        real = Trainer.train_step

        def crash(self, batch):
            if self.state.step == 3:
                raise Killed
            return real(self, batch)

        monkeypatch.setattr(Trainer, "train_step", crash)
        with pytest.raises(Killed):
            align(load_recipe(_recipe(tmp_path, tiny_chat_llama, method, "cut", **extra)), progress=False)
        monkeypatch.setattr(Trainer, "train_step", real)
        align(load_recipe(_recipe(tmp_path, tiny_chat_llama, method, "cut", **extra)), resume=True, progress=False)
    finally:
        TRAIN["checkpoint_every"] = 4
    a = load_pretrained(tmp_path / "full" / "final")[0].state_dict()
    b = load_pretrained(tmp_path / "cut" / "final")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss = lambda out: {r["step"]: r["loss"] for r in _rows(out) if "lr" in r}
    assert loss(tmp_path / "full")[4] == loss(tmp_path / "cut")[4]
    assert full["train"]["steps"] == 4


def test_bad_inputs_give_one_line(tmp_path, tiny_chat_llama, capsys):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "hi", "chosen": "a"}])  # fmt: skip
    recipe = _recipe(tmp_path, tiny_chat_llama, "dpo")
    cases = [
        (["--set", f"data.train={bad}"], f"{bad}:2: rejected: missing field"),
        (["--set", "align.reward_funcs=[no_such_module.f]"], "align.reward_funcs: cannot import 'no_such_module'"),
        (["--set", "align.num_generations=1"], "align.num_generations: 1 must be >= 2"),
    ]
    for i, (args, message) in enumerate(cases):
        method = "dpo" if i == 0 else "grpo"
        if i:
            args = [*args, "--set", "align.method=grpo"]
        assert main(["align", method, "--config", str(recipe), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_kl_is_zero_before_the_first_update_at_any_temperature(method, tmp_path, tiny_chat_llama, tiny_rm):
    """The reference's log-probs are taken at the sampling temperature, as the policy's are: with LoRA (policy ==
    reference until the first update) the first rollout's KL is 0, not the gap between two temperatures."""
    extra = {"lora": {"r": 4, "alpha": 8}, "temperature": 0.6}
    if method == "ppo":
        extra |= {"reward_model": str(tiny_rm), "minibatches": 1, "epochs": 1}
    else:
        extra |= {"num_generations": 2, "beta": 0.1}
    recipe = load_recipe(_recipe(tmp_path, tiny_chat_llama, method, **extra), ["train.max_steps=1"])
    align(recipe, progress=False)
    first = _rows(tmp_path / method)[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
