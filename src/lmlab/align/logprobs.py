"""Log-probabilities of completion tokens: the one function every aligner (DPO, PPO, GRPO) scores text with.

A batch holds whole sequences (prompt + completion, padded left or right) and a completion mask. Token t
is predicted by the logits at t - 1, so the vocabulary projection runs only at positions whose next token
belongs to the completion (`logits_mask`): a prompt of 200 tokens and a reply of 20 cost 20 rows of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy): logp[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) where completion_mask[b, t],
    0 elsewhere (B, T); entropy (B, T) of the distribution token t was drawn from (None unless asked).

    Sum logp over t for a sequence's log-probability. `temperature` divides the logits, as sampling did.
    """
    predict = completion_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    if attention_mask is not None:
        predict = predict & attention_mask[:, 1:].bool()
    logits_mask = F.pad(predict, (0, 1), value=False)  # (B, T)
    logits = model(input_ids, attention_mask=attention_mask, logits_mask=logits_mask).float()  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:][predict]  # (N,) in the same row-major order as the logits
    lse = logits.logsumexp(-1)  # (N,)
    token_logp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # (N,)
    shifted = F.pad(predict, (1, 0), value=False)  # (B, T): the positions of the predicted tokens
    logp = torch.zeros(input_ids.shape, dtype=token_logp.dtype, device=input_ids.device)
    logp = logp.masked_scatter(shifted, token_logp)
    ent = None
    if entropy:
        with torch.no_grad():  # logged, not trained on
            h = lse - (logits.softmax(-1) * logits).sum(-1)  # (N,)
            ent = torch.zeros_like(logp).masked_scatter(shifted, h)
    return logp, ent


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Each sequence's completion log-probability (B,): the sum of `completion_logprobs`."""
    return completion_logprobs(model, input_ids, attention_mask, completion_mask)[0].sum(-1)


def _shared_prompts(ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor) -> torch.Tensor | None:
    """Each pair's prompt length (B,) when both rows of every pair are [the same prompt][one contiguous completion]
    with no padding before the completion (what follows it is not scored and, the model being causal, changes
    nothing); None otherwise, e.g. left padding or a pair truncated differently."""
    T = ids.shape[-1]
    c = comp.bool()
    start = c.float().argmax(-1)  # (B, 2): first completion token
    last = T - 1 - c.flip(-1).float().argmax(-1)
    if not bool((start[:, 0] == start[:, 1]).all()) or not bool((start > 0).all()):
        return None
    if not bool((last - start + 1 == c.sum(-1)).all()) or not bool((attn.bool() | ~c).all()):
        return None  # a completion with holes, or one over padding
    prompt = torch.arange(T, device=ids.device) < start[..., None]  # (B, 2, T)
    if not bool((attn.bool() | ~prompt).all()):
        return None  # padding inside the prompt
    same = (ids[:, 0] == ids[:, 1]) | ~prompt[:, 0]
    return start[:, 0] if bool(same.all()) else None


def pair_logprobs(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """Completion log-probabilities (B, 2) of preference pairs (B, 2, T): chosen and rejected.

    Both replies of a pair share their prompt, which is most of the tokens in chat data (template and question
    vs a short reply), so each pair becomes one row [prompt][chosen][rejected]: the rejected reply's positions
    restart where the prompt ends and it sees the prompt but not the chosen reply (`branch_ids`), so the prompt
    runs through the model once and the rows are ~1 / (1 + prompt share) as long. Equal to scoring the two
    rows whole, gradients included (tested). Pairs that do not share a prompt fall back to that.
    """
    B, dev = ids.shape[0], ids.device
    # the layout is a few small integer tensors: worked out on the CPU (no device syncs on a GPU), moved once
    ids_c, attn_c, comp_c = ids.cpu(), attn.cpu(), comp.cpu()
    starts = _shared_prompts(ids_c, attn_c, comp_c)
    if starts is None:
        flat = (x.flatten(0, 1) for x in (ids, attn, comp))
        return completion_logprobs(model, *flat)[0].sum(-1).view(B, 2)
    P, C = starts.tolist(), comp_c.sum(-1).tolist()  # prompt lengths (B,), reply lengths (B, 2)
    L = max(p + c + r for p, (c, r) in zip(P, C))
    row = torch.zeros((B, L), dtype=ids.dtype)
    mask = torch.zeros((B, L), dtype=attn.dtype)
    pos = torch.zeros((B, L), dtype=torch.long)
    branch = torch.zeros((B, L), dtype=torch.long)
    want = torch.zeros((B, L), dtype=torch.bool)  # positions whose logits are needed
    for b, (p, (c, r)) in enumerate(zip(P, C)):
        row[b, : p + c] = ids_c[b, 0, : p + c]
        row[b, p + c : p + c + r] = ids_c[b, 1, p : p + r]
        mask[b, : p + c + r] = 1
        pos[b, : p + c] = torch.arange(p + c)
        pos[b, p + c : p + c + r] = torch.arange(p, p + r)
        branch[b, p : p + c], branch[b, p + c : p + c + r] = 1, 2
        want[b, p - 1 : p + c - 1] = True  # the last prompt position predicts both replies' first token
        want[b, p + c : p + c + r - 1] = True
    at = torch.full((B, L), -1, dtype=torch.long)
    at[want] = torch.arange(int(want.sum()))  # (b, position) -> row of the logits
    rows, targets, owner = [], [], []
    for b, (p, (c, r)) in enumerate(zip(P, C)):
        for j, (first, n) in enumerate(((p, c), (p + c, r))):
            # reply token 0 is predicted at the prompt's last position, token t at the reply's position t - 1
            rows.append(torch.cat([at[b, p - 1 : p], at[b, first : first + n - 1]]))
            targets.append(row[b, first : first + n])
            owner.append(torch.full((n,), 2 * b + j))
    row, mask, pos, branch, want = (x.to(dev) for x in (row, mask, pos, branch, want))
    rows, targets, owner = (torch.cat(x).to(dev) for x in (rows, targets, owner))
    h = model.hidden_states(row, attention_mask=mask, position_ids=pos, branch_ids=branch)
    logits = model.full_vocab(model.lm_head(h[want]))  # (N, V): one row per wanted position, row-major
    logp_all = logits.float().log_softmax(-1)
    token = logp_all[rows, targets]  # (tokens,)
    return torch.zeros(2 * B, dtype=token.dtype, device=dev).index_add(0, owner, token).view(B, 2)
