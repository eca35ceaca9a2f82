"""The Trainer's contracts: accumulation, exact resume after a kill, early stopping, the NaN guard."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.train import Trainer
from lmlab.train.config import TrainConfig, apply_overrides, load_recipe, section_config
from lmlab.train.optim import param_groups
from lmlab.train.schedule import lr_at
from tests.train.helpers import RandomTokens, config, tiny_model


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, optimizer):
    # SGD moves each weight by lr * grad, so equal parameters mean equal gradients. Adam's first step is
    # lr * g / (|g| + eps): for gradients near eps it magnifies float noise, so it gets a looser bound.
    tol = 1e-5 if optimizer == "sgd" else 1e-4
    runs = []
    for micro, accum in [(8, 1), (2, 4)]:
        model = tiny_model()
        cfg = config(
            tmp_path / f"{micro}x{accum}", micro_batch_size=micro, grad_accum=accum, max_steps=1, optimizer=optimizer
        )
        Trainer(model, RandomTokens(8), cfg, progress=False).fit()
        runs.append(_params(model))
    for k in runs[0]:
        assert (runs[0][k] - runs[1][k]).abs().max().item() <= tol, k
    assert any(not torch.equal(runs[0][k], _params(tiny_model())[k]) for k in runs[0])  # it did train


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from lmlab.train import Trainer
    from tests.train.helpers import RandomTokens, config, tiny_model
    import pathlib
    from lmlab.train.objectives import causal_lm_loss

    kill_at = {kill_at}
    cfg = config(pathlib.Path({tmp!r}), max_steps={steps}, checkpoint_every={every}, eval_every=1000, keep_last=5)
    trainer = Trainer(tiny_model(resid_dropout=0.1, embd_dropout=0.1), RandomTokens(8), cfg, progress=False)

    def loss_fn(model, batch):
        if kill_at is not None and trainer.state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash
        return causal_lm_loss(model, batch[0], batch[1])

    trainer.loss_fn = loss_fn
    trainer.fit(resume={resume})
    """
)


def _run(tmp, root, steps, every, kill_at, resume):
    script = KILL_SCRIPT.format(root=str(root), tmp=str(tmp), steps=steps, every=every, kill_at=kill_at, resume=resume)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def _losses(path):
    out = {}
    for line in (path / "run" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_resume_after_kill_is_bitwise_identical(tmp_path, request):
    root = request.config.rootpath
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = _run(straight, root, steps=8, every=4, kill_at=None, resume=False)
    assert r.returncode == 0, r.stderr
    r = _run(killed, root, steps=8, every=4, kill_at=5, resume=False)
    assert r.returncode == -9  # killed mid-run, after the step-4 checkpoint
    assert (killed / "run" / "checkpoints" / "step-000004").exists()
    assert not (killed / "run" / "checkpoints" / "step-000008").exists()
    r = _run(killed, root, steps=8, every=4, kill_at=None, resume=True)
    assert r.returncode == 0, r.stderr
    want, got = _losses(straight), _losses(killed)
    assert sorted(want) == list(range(1, 9))
    for step in range(5, 9):  # dropout is on: the RNG state must come back too
        assert got[step] == want[step], (step, got[step], want[step])
    final_a = torch.load(straight / "run" / "final" / "trainer_state.pt", weights_only=True)["train"]
    final_b = torch.load(killed / "run" / "final" / "trainer_state.pt", weights_only=True)["train"]
    assert final_a == final_b


def test_early_stopping_stops_on_time_and_restores_the_best_weights(tmp_path, monkeypatch):
    model = tiny_model()
    cfg = config(tmp_path, max_steps=50, eval_every=2, early_stopping_patience=2)
    trainer = Trainer(model, RandomTokens(8), cfg, val_data=RandomTokens(8, seed=1), progress=False)
    scripted = iter([3.0, 2.5, 2.6, 2.7, 2.4])
    snapshots = []

    def fake_eval():
        snapshots.append(_params(trainer.raw))
        return {"val_loss": next(scripted)}

    monkeypatch.setattr(trainer, "evaluate", fake_eval)
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] == 8  # evals at 2, 4 (best), 6, 8 -> 2 bad in a row
    assert summary["best_step"] == 4
    best = snapshots[1]
    assert all(torch.equal(best[k], v) for k, v in _params(trainer.raw).items())
    assert not all(torch.equal(snapshots[3][k], v) for k, v in best.items())


def test_nan_guard_skips_then_stops(tmp_path):
    from lmlab.train.objectives import causal_lm_loss

    model = tiny_model()
    trainer = Trainer(model, RandomTokens(8), config(tmp_path, max_steps=6, nan_patience=3), progress=False)
    before = {}

    def loss_fn(m, batch):
        loss = causal_lm_loss(m, *batch)
        if trainer.state.step == 2:
            before.update(_params(trainer.raw))
            return loss * float("nan")
        return loss

    trainer.loss_fn = loss_fn
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    skipped = [r for r in trainer.records() if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == 3 and math.isnan(skipped[0]["loss"])

    trainer2 = Trainer(tiny_model(), RandomTokens(8), config(tmp_path / "b", nan_patience=3), progress=False)
    trainer2.loss_fn = lambda m, b: causal_lm_loss(m, *b) * float("inf")
    with pytest.raises(LmlabError, match="not finite for 3 steps"):
        trainer2.fit()


def test_skipped_step_leaves_weights_untouched(tmp_path):
    from lmlab.train.objectives import causal_lm_loss

    trainer = Trainer(tiny_model(), RandomTokens(8), config(tmp_path, max_steps=1), progress=False)
    trainer.loss_fn = lambda m, b: causal_lm_loss(m, *b) * float("nan")
    before = _params(trainer.raw)
    trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in _params(trainer.raw).items())


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_model(qkv_bias=True)
    decay, no_decay = param_groups(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.weight", "norm.weight", "layers.0.attn.q.bias"}
    assert all(p.dim() == 2 for p in decay["params"]) and "layers.0.attn.q.weight" in {
        names[id(p)] for p in decay["params"]
    }


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule=schedule, decay_fraction=0.5)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    tail = lrs[10:]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(tail))  # never increases after warmup
    if schedule == "constant":
        assert set(tail) == {1.0}
    else:
        assert tail[-1] == pytest.approx(0.1, abs=0.02)
    if schedule == "wsd":
        assert lrs[54] == 1.0 and lrs[56] < 1.0  # stable until 55 = 110 * (1 - 0.5), then decays
    if schedule == "cosine":
        assert lrs[60] == pytest.approx(0.55, abs=0.01)  # halfway: the mean of lr and min_lr


def test_l2_penalty_and_label_smoothing_change_the_update(tmp_path):
    results = {}
    for name, kw in {"plain": {}, "l2": {"l2": 0.1}, "l1": {"l1": 0.01}, "smooth": {"label_smoothing": 0.2}}.items():
        model = tiny_model()
        cfg = config(tmp_path / name, max_steps=1, weight_decay=0.0, optimizer="sgd", **kw)  # SGD: update ∝ gradient
        Trainer(model, RandomTokens(8), cfg, progress=False).fit()
        results[name] = _params(model)["layers.0.mlp.up.weight"]
    for name in ("l2", "l1", "smooth"):
        assert not torch.allclose(results[name], results["plain"]), name


def test_recipe_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: llama-tiny\ntrain:\n  lr: 1.0e-3\n  max_steps: 10\n")
    r = load_recipe(recipe, ["train.lr=3e-4", "train.schedule=wsd", "model.n_layer=3"])
    assert r.train.lr == 3e-4 and r.train.schedule == "wsd" and r.model == {"preset": "llama-tiny", "n_layer": 3}
    with pytest.raises(LmlabError, match=r"r\.yaml: train\.lrr: unknown setting"):
        load_recipe(recipe, ["train.lrr=1"])
    with pytest.raises(LmlabError, match=r"train\.schedule"):
        load_recipe(recipe, ["train.schedule=triangle"])
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1,\n")
    with pytest.raises(LmlabError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_section_config_names_unknown_keys_and_reads_yaml_numbers():
    import dataclasses

    @dataclasses.dataclass
    class Section:
        rate: float = 0.1
        n: int = 2
        cap: float | None = None

    got = section_config(Section, {"rate": "1e-3", "n": "4", "cap": "2e-2"}, "sec", "x.yaml", optional_floats=("cap",))
    assert got == Section(rate=1e-3, n=4, cap=2e-2)
    with pytest.raises(LmlabError, match=r"x\.yaml: sec\.rat: unknown setting; known: cap, n, rate"):
        section_config(Section, {"rat": 1}, "sec", "x.yaml")
    with pytest.raises(LmlabError, match=r"x\.yaml: sec\.cap: 'big' is not a number"):
        section_config(Section, {"cap": "big"}, "sec", "x.yaml", optional_floats=("cap",))


def _gpu_policy_on_cpu():
    """The GPU's step (no host sync between logs) run on the CPU: same code path, testable here."""
    import dataclasses

    from lmlab.utils.device import forced_policy, policy

    return forced_policy(dataclasses.replace(policy("cpu"), sync_every_step=False))


@pytest.mark.parametrize("nan_at", [None, 2])
def test_device_side_step_equals_the_host_checked_step(tmp_path, nan_at):
    """Deferred syncs change nothing: same weights, same skips, the NaN step skipped inside fused AdamW."""
    from lmlab.train.objectives import causal_lm_loss

    results = []
    for deferred in (False, True):
        ctx = _gpu_policy_on_cpu() if deferred else contextlib.nullcontext()
        with ctx:
            cfg = config(tmp_path / str(deferred), max_steps=5, log_every=2, eval_every=100, nan_patience=3)
            trainer = Trainer(tiny_model(), RandomTokens(8), cfg, progress=False)
            assert trainer._deferred == deferred

            def loss_fn(m, batch, trainer=trainer):
                loss = causal_lm_loss(m, *batch)
                return loss * float("nan") if trainer.state.step == nan_at else loss

            trainer.loss_fn = loss_fn
            summary = trainer.fit()
        results.append((_params(trainer.raw), summary["skipped_steps"], trainer.optimizer.state_dict()))
    (p0, s0, _), (p1, s1, o1) = results
    assert s0 == s1 == (0 if nan_at is None else 1)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    steps = [float(st["step"]) for st in o1["state"].values()]
    assert steps and all(s == 5 - s1 for s in steps)  # a skipped update does not count as an Adam step


def test_device_side_nan_streak_stops_at_the_next_log(tmp_path):
    from lmlab.train.objectives import causal_lm_loss

    with _gpu_policy_on_cpu():
        cfg = config(tmp_path, max_steps=20, log_every=4, eval_every=100, nan_patience=3)
        trainer = Trainer(tiny_model(), RandomTokens(8), cfg, progress=False)
        trainer.loss_fn = lambda m, b: causal_lm_loss(m, *b) * float("inf")
        with pytest.raises(LmlabError, match="not finite for 4 steps"):
            trainer.fit()
