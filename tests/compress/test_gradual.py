"""Gradual pruning: Zhu & Gupta's cubic schedule, hit exactly at the scheduled steps of a real Trainer run."""

from __future__ import annotations

import itertools

import pytest

from lmlab.compress.gradual import GradualPruning, PruneConfig, cubic_sparsity, prune_config, recipe_callbacks
from lmlab.compress.sparsity import prunable
from lmlab.errors import LmlabError
from lmlab.train import Trainer
from lmlab.train.config import recipe_from_dict
from lmlab.train.trainer import Callback
from tests.train.helpers import RandomTokens, config, tiny_model


def test_schedule_follows_the_cubic_formula():
    cfg = PruneConfig(final_sparsity=0.8, initial_sparsity=0.1, start_step=5, every=3, updates=4)
    assert cubic_sparsity(4, cfg) == 0.0
    for t in range(5, 30):
        frac = min((t - 5) / 12, 1)
        assert cubic_sparsity(t, cfg) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - frac) ** 3)
    assert cubic_sparsity(5, cfg) == pytest.approx(0.1) and cubic_sparsity(17, cfg) == pytest.approx(0.8)


class Record(Callback):
    """Counts the zeros of every prunable weight after each step."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_step_end(self, trainer: Trainer) -> None:
        self.seen[trainer.state.step] = [int((lin.weight == 0).sum()) for lin in prunable(trainer.raw).values()]


def test_target_sparsity_is_hit_at_exactly_the_scheduled_steps(tmp_path):
    cfg = PruneConfig(final_sparsity=0.7, initial_sparsity=0.2, start_step=2, every=3, updates=3, scope="layer")
    model = tiny_model()
    pruner, record = GradualPruning(cfg), Record()
    trainer = Trainer(model, RandomTokens(8), config(tmp_path, max_steps=14, save_checkpoints=False, eval_every=100),
                      progress=False, callbacks=[pruner, record])  # fmt: skip
    trainer.fit()
    sizes = [lin.weight.numel() for lin in prunable(model).values()]
    expected = 0.0
    for step in range(1, 15):
        if step in (2, 5, 8, 11):  # t0 + j * dt, j = 0..n
            expected = cubic_sparsity(step, cfg)
        assert record.seen[step] == [round(expected * n) for n in sizes], step
    assert [s for s, _ in pruner.history] == [2, 5, 8, 11]
    assert record.seen[14] == [round(0.7 * n) for n in sizes]


def test_pruned_weights_stay_pruned_as_the_schedule_rises(tmp_path):
    cfg = PruneConfig(final_sparsity=0.6, start_step=0, every=2, updates=2)
    model = tiny_model()
    masks_seen = []

    class Keep(Callback):
        def on_step_end(self, trainer):
            masks_seen.append({n: (lin.weight == 0).clone() for n, lin in prunable(trainer.raw).items()})

    Trainer(model, RandomTokens(8), config(tmp_path, max_steps=5, save_checkpoints=False, eval_every=100),
            progress=False, callbacks=[GradualPruning(cfg), Keep()]).fit()  # fmt: skip
    for a, b in itertools.pairwise(masks_seen):
        assert all(bool((b[n] | ~a[n]).all()) for n in a)  # zero once, zero after


def test_prune_section_of_a_recipe(tmp_path):
    recipe = recipe_from_dict({"prune": {"final_sparsity": 0.5, "every": 2, "updates": 2}})
    (cb,) = recipe_callbacks(recipe)
    assert cb.cfg.end_step == 4
    assert recipe_callbacks(recipe_from_dict({})) == []
    with pytest.raises(LmlabError, match=r"prune\.final_sparsity"):
        prune_config({"final_sparsity": 1.2})
    with pytest.raises(LmlabError, match=r"prune\.speed"):
        prune_config({"speed": 2})


def test_pretraining_with_a_prune_section_needs_its_callback(tmp_path):
    from lmlab.train.pretrain import pretrain

    recipe = recipe_from_dict({"prune": {"final_sparsity": 0.5}, "data": {"tokens": str(tmp_path)}})
    with pytest.raises(LmlabError, match="prune: section"):
        pretrain(recipe)


def test_lmlab_pretrain_with_a_prune_section_ends_at_the_final_sparsity(tmp_path, request):
    from lmlab.cli import main
    from lmlab.data import tokenize_files
    from lmlab.model.checkpoint import load_pretrained
    from lmlab.tokenizer.train import train_tokenizer_files

    sample = request.config.rootpath / "data" / "samples"
    train_tokenizer_files([sample], 600, tmp_path / "tokenizer", progress=False)
    tokenize_files(tmp_path / "tokenizer", [sample], tmp_path / "tokens", val_fraction=0.1, progress=False)
    sets = [f"data.tokens={tmp_path / 'tokens'}", "model.preset=llama-tiny", f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=12", "train.micro_batch_size=4", "train.block_size=32", "train.warmup_steps=2",
            "train.eval_every=6", "train.eval_batches=1", "prune.final_sparsity=0.6", "prune.start_step=2",
            "prune.every=2", "prune.updates=4"]  # fmt: skip
    argv = ["pretrain", "--config", str(request.config.rootpath / "recipes" / "pretrain" / "tiny.yaml")]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    model, _ = load_pretrained(tmp_path / "run" / "final")
    for layer in prunable(model).values():
        assert int((layer.weight == 0).sum()) == round(0.6 * layer.weight.numel())
