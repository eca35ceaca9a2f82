"""Distillation: the loss against its closed form and F.kl_div, the top-k cache, and a distilled draft that
keeps speculative decoding exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.compress.distill import (
    DistillConfig,
    DistillLoss,
    Windows,
    build_student,
    cache_teacher_topk,
    distill_loss,
    first_layers,
)
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.speculative import speculative_generate
from lmlab.model.config import ModelConfig
from lmlab.train import Trainer
from tests.train.helpers import config


def _softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_equals_its_closed_form_on_fixed_logits():
    s, t, target, T, alpha = [1.0, 2.0, 3.0, -1.0], [3.0, 1.0, 0.0, 0.5], 2, 2.0, 0.7
    ps, pt = _softmax([x / T for x in s]), _softmax([x / T for x in t])
    forward = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    reverse = sum(q * math.log(q / p) for p, q in zip(pt, ps))
    ce = -math.log(_softmax(s)[target])
    S, Tt, y = torch.tensor([[s]]), torch.tensor([[t]]), torch.tensor([[target]])
    got = distill_loss(S, Tt, y, alpha, T, "forward")
    assert float(got) == pytest.approx(alpha * T * T * forward + (1 - alpha) * ce, rel=1e-6)
    got = distill_loss(S, Tt, y, alpha, T, "reverse")
    assert float(got) == pytest.approx(alpha * T * T * reverse + (1 - alpha) * ce, rel=1e-6)
    assert float(distill_loss(S, Tt, y, 1.0, T)) == pytest.approx(T * T * forward, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kl_matches_torch_kl_div(T):
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    ref_fwd = F.kl_div(ls.reshape(10, 11), lt.reshape(10, 11), log_target=True, reduction="batchmean")
    ref_rev = F.kl_div(lt.reshape(10, 11), ls.reshape(10, 11), log_target=True, reduction="batchmean")
    torch.testing.assert_close(distill_loss(s, t, None, 1.0, T, "forward"), T * T * ref_fwd)
    torch.testing.assert_close(distill_loss(s, t, None, 1.0, T, "reverse"), T * T * ref_rev)


def test_ignored_positions_do_not_count():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    y = torch.tensor([[1, -100, 3, -100]])
    want = distill_loss(s[:, [0, 2]], t[:, [0, 2]], y[:, [0, 2]], 0.5, 2.0)
    torch.testing.assert_close(distill_loss(s, t, y, 0.5, 2.0), want)


def test_top_k_with_every_token_is_the_full_forward_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    top = t.topk(9, dim=-1)
    torch.testing.assert_close(distill_loss(s, None, None, 1.0, 2.0, top=(top.values, top.indices)),
                               distill_loss(s, t, None, 1.0, 2.0))  # fmt: skip
    small = t.topk(3, dim=-1)  # fewer tokens: a different (approximate) loss, not the full one
    approx = distill_loss(s, None, None, 1.0, 2.0, top=(small.values, small.indices))
    assert not torch.allclose(approx, distill_loss(s, t, None, 1.0, 2.0), rtol=1e-3)


def _target(seed: int = 0) -> lmlab.Transformer:
    torch.manual_seed(seed)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.1, eos_token_id=None)).eval()


def _windows(target: lmlab.Transformer, n: int = 32, length: int = 17) -> torch.Tensor:
    """Text the target itself likes: its own greedy continuations of random prompts (so there is
    something learnable to distil)."""
    torch.manual_seed(1)
    rows = []
    for _ in range(n):
        p = torch.randint(0, 512, (3,)).tolist()
        rows.append(p + generate(target, None, p, GenerationConfig(max_new_tokens=length - 3))[0].token_ids)
    return torch.tensor(rows)


def test_cached_top_k_is_written_once_and_reused(tmp_path):
    target = _target()
    w = _windows(target, n=6)
    path = tmp_path / "topk.safetensors"
    a = cache_teacher_topk(target, w, 5, path, progress=False)
    with torch.no_grad():
        want = target(w[:, :-1]).topk(5, dim=-1)
    torch.testing.assert_close(a["values"].float(), want.values, atol=1e-2, rtol=1e-3)  # stored as float16
    assert torch.equal(a["indices"].long(), want.indices)
    mtime = path.stat().st_mtime_ns
    cache_teacher_topk(target, w, 5, path, progress=False)
    assert path.stat().st_mtime_ns == mtime
    other = _target(seed=1)  # another teacher over the same windows: made again, with its own logits
    b = cache_teacher_topk(other, w, 5, path, progress=False)
    assert path.stat().st_mtime_ns != mtime and not torch.equal(b["values"], a["values"])


def test_teacher_pass_copies_saved_rows_in_stretches_of_the_file(tmp_path):
    """A large saved file, reused by a shuffled, grown corpus: saved rows are read a stretch of the file
    at a time (runs of <= 256 rows), land in their new places, and only the new windows (plus the
    first saved one, the teacher check) are computed."""
    from lmlab.compress.distill import teacher_pass

    seen: list[int] = []

    def fn(_, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(len(rows))
        return {"twice": rows.float() * 2, "total": rows.sum(-1, keepdim=True)}

    teacher = torch.nn.Linear(1, 1)
    torch.manual_seed(0)
    windows = torch.randint(0, 10_000, (700, 6))
    path = tmp_path / "p.safetensors"
    teacher_pass(teacher, windows, path, fn, "t", batch=64, progress=False)
    grown = torch.cat([windows[torch.randperm(700)[:650]], torch.randint(10_000, 20_000, (5, 6))])
    grown = grown[torch.randperm(len(grown))]
    seen.clear()
    got = teacher_pass(teacher, grown, path, fn, "t", batch=64, progress=False)
    assert seen == [1, 5]  # the check, then the 5 new windows
    assert torch.equal(got["twice"], grown[:, :-1].float() * 2) and torch.equal(got["windows"], grown)
    assert torch.equal(got["total"], grown[:, :-1].sum(-1, keepdim=True))


@pytest.mark.parametrize("mode", ["online", "cache"])
def test_distilled_draft_keeps_speculative_decoding_exact(tmp_path, mode):
    target = _target()
    target.requires_grad_(False)
    w = _windows(target)
    student = first_layers(target, 1)
    assert student.cfg.n_layer == 1 and student.embed.weight is not target.embed.weight
    dc = DistillConfig(student={"layers": 1}, temperature=1.0, alpha=1.0, teacher_logits=mode, top_k=16)
    cache = cache_teacher_topk(target, w, 16, tmp_path / "c.safetensors", progress=False) if mode == "cache" else None
    loss = DistillLoss(dc, target, cache)
    data = Windows(w, 8)
    # train mode: the cache run is scored on its own objective (top-k), the online run on the full KL
    before = float(loss(student.train(), data.get_batch(0)).detach())
    cfg = config(tmp_path, max_steps=30, lr=3e-3, warmup_steps=0, eval_every=1000, save_checkpoints=False)
    Trainer(student, data, cfg, loss_fn=loss, progress=False).fit()
    after = float(loss(student.train(), data.get_batch(0)).detach())
    assert after < before  # it learned from the teacher
    prompt = torch.randint(0, 512, (5,)).tolist()
    gen = GenerationConfig(max_new_tokens=24)
    want = generate(target, None, prompt, gen)[0].token_ids
    got, stats = speculative_generate(target, student.eval(), None, prompt, gen, num_draft_tokens=3)
    assert got.token_ids == want
    assert stats.proposed > 0


def test_vocabulary_mismatch_is_named():
    target = _target()
    torch.manual_seed(0)
    other = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=256)).eval()
    with pytest.raises(LmlabError, match=r"draft.*vocabulary \(256 tokens\) is not the target's \(512\)"):
        speculative_generate(target, other, None, [1, 2, 3], GenerationConfig(max_new_tokens=4))
    student = build_student({"preset": "llama-tiny", "n_layer": 1}, target)
    assert student.cfg.vocab_size == 512  # a preset student takes the teacher's vocabulary
    with pytest.raises(LmlabError, match=r"layers 9 is outside 1\.\.2"):
        build_student({"layers": 9}, target)


def test_bad_distill_settings_are_named():
    with pytest.raises(LmlabError, match=r"distill\.kl"):
        DistillConfig(kl="sideways")
    with pytest.raises(LmlabError, match="reverse KL needs the teacher's full distribution"):
        DistillConfig(kl="reverse", teacher_logits="cache")


def test_distill_recipe_runs_end_to_end(smollm2_gguf, tmp_path):
    """`lmlab distill` on a tiny teacher with SmolLM2's tokenizer: a student checkpoint that loads and
    has the teacher's vocabulary, and a top-k cache on disk."""
    from lmlab.compress.distill import distill
    from lmlab.model.checkpoint import load_pretrained, save_pretrained
    from lmlab.train.config import recipe_from_dict

    _, tokenizer = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    teacher = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, tie_embeddings=True))
    save_pretrained(teacher, tokenizer, tmp_path / "teacher")
    recipe = recipe_from_dict({
        "distill": {"teacher": str(tmp_path / "teacher"), "student": {"layers": 1}, "teacher_logits": "cache",
                    "top_k": 8},
        "data": {"datasets": ["kjv"], "max_windows": 8, "max_val_windows": 2},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "block_size": 16, "micro_batch_size": 2,
                  "warmup_steps": 0, "eval_every": 1000, "eval_batches": 1},
    })  # fmt: skip
    summary = distill(recipe, progress=False)
    student, tok = load_pretrained(summary["model"])
    assert student.cfg.n_layer == 1 and student.cfg.vocab_size == 49152 and tok is not None
    assert (tmp_path / "run" / "teacher_topk.safetensors").exists()
    assert summary["steps"] == 2 and math.isfinite(summary["val_after"])
