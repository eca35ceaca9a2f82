"""Multiple choice: per-choice log-likelihoods equal transformers' on the same weights, batched or not."""

from __future__ import annotations

import pytest
import torch

from lmlab.eval.harness import run_multiple_choice
from lmlab.eval.multiple_choice import choice_predictions, loglikelihoods
from lmlab.eval.tasks import load_task

DOCS = [
    {"question": "What is two plus two?", "choices": ["three", "four", "five", "twenty-two"], "answer": "B",
     "subject": "general"},
    {"question": "Which city is the capital of France?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": "A",
     "subject": "general"},
    {"question": "What do astronomers study?", "choices": ["rocks", "fish", "stars and galaxies", "brown foxes"],
     "answer": "C", "subject": "general"},
    {"question": "The quick brown fox jumps over the lazy ...", "choices": ["cat", "dog", "fox", "city"],
     "answer": "B", "subject": "general"},
]  # fmt: skip


def reference_ll(model, ctx: list[int], cont: list[int]) -> float:
    """sum log p(cont | ctx) from one unpadded transformers forward."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(logp[len(ctx) - 1 :].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihoods_equal_transformers_with_padding(tiny_pair):
    ours, _, ref, _ = tiny_pair
    g = torch.Generator().manual_seed(1)
    reqs = [
        (torch.randint(0, 320, (int(a),), generator=g).tolist(), torch.randint(0, 320, (int(b),), generator=g).tolist())
        for a, b in [(5, 1), (40, 3), (17, 7), (1, 2), (60, 1)]
    ]
    reqs += [(reqs[4][0], [7]), (reqs[4][0], [9])]  # same context, one-token answers: one shared forward
    got = loglikelihoods(ours, reqs, batch_size=3)  # batches mix lengths: right padding is exercised
    for (ctx, cont), (score, _) in zip(reqs, got):
        assert score == pytest.approx(reference_ll(ref, ctx, cont), abs=1e-3)
    assert [s for s, _ in loglikelihoods(ours, reqs, batch_size=1)] == pytest.approx([s for s, _ in got], abs=1e-4)


def test_mmlu_task_choices_equal_transformers(tiny_pair):
    ours, tok, ref, _ = tiny_pair
    task = load_task("mmlu")
    r = run_multiple_choice(ours, tok, task, DOCS, fewshot_pool=DOCS, num_fewshot=1, batch_size=4)
    assert r["n"] == 4 and 0 <= r["acc"] <= 1
    for rec, doc in zip(r["records"], DOCS):
        shots = task.fewshot(doc, DOCS, 1)
        assert shots and shots[0] != doc
        ctx = task.context(doc, shots)
        assert ctx.startswith("The following are multiple choice questions (with answers) about")
        assert ctx.endswith("D. " + doc["choices"][3] + "\nAnswer:")
        ctx_ids = tok.encode(ctx)
        expected = [reference_ll(ref, ctx_ids, tok.encode(" " + c, add_special_tokens=False)) for c in "ABCD"]
        assert rec["loglikelihoods"] == pytest.approx(expected, abs=1e-3)
        assert rec["target"] == "ABCD".index(doc["answer"])
        assert rec["acc"] == float(max(range(4), key=expected.__getitem__) == rec["target"])


def test_acc_norm_divides_by_bytes():
    picks = choice_predictions([-4.0, -6.0], [" a", " abcdef"])
    assert picks == {"pred": 0, "pred_norm": 1}  # -6/7 > -4/2


def test_loglikelihoods_never_project_the_whole_batch(tiny_pair):
    """Memory: logits exist only at the positions that predict a continuation, never batch x length x vocab."""
    ours, _, _, _ = tiny_pair
    shapes = []
    hook = ours.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        reqs = [(list(range(1, 80)), [5, 6]), (list(range(1, 60)), [7]), (list(range(1, 60)), [8, 9, 10])]
        got = loglikelihoods(ours, reqs, batch_size=8)
    finally:
        hook.remove()
    assert len(shapes) == 1 and len(shapes[0]) == 2  # one forward, (rows, vocab)
    assert shapes[0][0] == 2 + 1 + 3  # each row's answer positions only
    assert [s for s, _ in got] == pytest.approx([s for s, _ in loglikelihoods(ours, reqs, batch_size=1)], abs=1e-4)
