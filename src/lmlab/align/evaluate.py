"""Before/after measurements of an aligned policy: greedy answers to held-out prompts, their pass rate on a
verifiable task, and their reward-model score, each with a bootstrap standard error."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmlab.align.data import PromptRecord, render_prompt
from lmlab.align.reward_model import RewardScorer
from lmlab.align.tasks import is_correct
from lmlab.eval.bootstrap import bootstrap_se
from lmlab.tokenizer.tokenizer import Tokenizer


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[PromptRecord], max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:  # fmt: skip
    """Greedy replies of the model to each prompt (its chat template), batched with the KV cache."""
    from lmlab.generate import generate

    was = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = [render_prompt(tokenizer, p.messages) for p in prompts[i : i + batch_size]]
        out += [g.text.strip() for g in generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0)]
    model.train(was)
    return out


def policy_report(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[PromptRecord],
    *,
    max_new_tokens: int = 64,
    scorer: RewardScorer | None = None,
    keep_answers: int = 5,
) -> dict[str, Any]:
    """Pass rate (prompts with answers) and mean reward-model score (with a scorer) of greedy answers."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    out: dict[str, Any] = {"prompts": len(prompts)}
    checked = [float(is_correct(a, p.answer)) for a, p in zip(answers, prompts) if p.answer is not None]
    if checked:
        out["pass_rate"], out["pass_rate_se"] = float(np.mean(checked)), bootstrap_se(checked)
        out["per_prompt_pass"] = checked  # kept for a paired comparison of before and after (`paired_change`)
    if scorer is not None:
        scores = [float(x) for x in scorer.score_texts([p.messages for p in prompts], answers)]
        out["rm_score"], out["rm_score_se"] = float(np.mean(scores)), bootstrap_se(scores)
        out["per_prompt_rm_score"] = scores
    out["samples"] = [{"prompt": p.messages[-1]["content"], "answer": a}
                      for p, a in zip(prompts[:keep_answers], answers)]  # fmt: skip
    return out


def paired_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before of each per-prompt measurement both hold (the same prompts), with a paired-bootstrap 95% CI."""
    from lmlab.eval.bootstrap import paired_bootstrap

    out = {}
    for key, per_prompt in (("pass_rate", "per_prompt_pass"), ("rm_score", "per_prompt_rm_score")):
        a, b = before.get(per_prompt), after.get(per_prompt)
        if a and b and len(a) == len(b):
            out[key] = paired_bootstrap(a, b)
    return out
