"""Multiple choice by log-likelihood: score each choice as sum log p(choice tokens | context), pick the best."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmlab.utils.progress import progress_bar


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether it is the greedy continuation) per (context ids, continuation ids)."""
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    # requests with the same input row share one forward: MMLU's four one-token answers need one pass, not four
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i} has an empty continuation")
        full = (ctx + cont)[:-1]  # the last token is never an input
        if max_length is not None:
            full = full[-max_length:]  # truncate the context on the left
        rows.setdefault(tuple(full), []).append(i)
    # longest first: similar lengths share a batch, so padding stays small
    unique = sorted(rows, key=len, reverse=True)
    for b in progress_bar(range(0, len(unique), batch_size), desc="loglikelihood", disable=not progress, leave=False):
        batch = unique[b : b + batch_size]
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for j, r in enumerate(batch):  # right padding: positions of real tokens are unchanged
            ids[j, : len(r)] = torch.tensor(r, device=device)
            mask[j, : len(r)] = 1
        # only the positions that predict a continuation token get logits: a (B, W, V) tensor of a 49k
        # vocabulary is 1.6 GB at batch 8 x 1024, and its log-softmax as much again
        want = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
        for j, r in enumerate(batch):
            want[j, len(r) - max(len(requests[i][1]) for i in rows[r]) : len(r)] = True
        logp = F.log_softmax(model(ids, attention_mask=mask, logits_mask=want).float(), dim=-1)  # (N, V)
        start = torch.cumsum(want.sum(-1), 0) - want.sum(-1)  # row j's first kept position in logp
        for j, r in enumerate(batch):
            kept = int(want[j].sum())
            for i in rows[r]:
                cont = requests[i][1]
                n = len(cont)
                first = int(start[j]) + kept - n
                lp = logp[first : first + n]  # (n, V): the positions that predict the continuation
                target = torch.tensor(cont, device=device)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
    return results  # type: ignore[return-value]


def choice_predictions(scores: list[float], choices: list[str]) -> dict[str, Any]:
    """acc and acc_norm picks: argmax of the log-likelihood, and of it divided by the choice's UTF-8 byte length."""
    norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, choices)]
    return {
        "pred": max(range(len(scores)), key=scores.__getitem__),
        "pred_norm": max(range(len(norm)), key=norm.__getitem__),
    }
