"""Beam search: keep the num_beams best partial sequences by total log-probability.

Finished hypotheses are ranked by sum_logprob / generated_length ** length_penalty, so
length_penalty > 1 favours longer outputs and < 1 shorter ones. The bookkeeping follows
transformers' vectorized beam search step for step (candidates, finishing, the early-stop
heuristic), so outputs are token-identical to its `generate(num_beams=...)`.
"""

from __future__ import annotations

import torch

from lmlab.generate import cpu_kernels
from lmlab.generate.config import GenerationConfig
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import apply_processors, build_processors
from lmlab.model.transformer import Transformer

NEG = -1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick beams along dim 1: t (B, K, ...) with idx (B, K') -> (B, K', ...)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.gather(t, 1, idx.expand(*idx.shape[:2], *t.shape[2:]))


@torch.inference_mode()
def beam_search(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    eos: list[int],
    pad_id: int,
) -> torch.Tensor:
    """(B * num_return_sequences, prompt + generated) token ids, best beams first."""
    B, T = input_ids.shape
    K, lp, early = config.num_beams, config.length_penalty, config.early_stopping
    device = input_ids.device
    max_len = T + config.max_new_tokens
    keep = max(2, 1 + len(eos)) * K  # enough candidates that K survive even if all EOS variants end
    top_k_mask = torch.arange(keep, device=device) < K  # only the top K candidates may finish a beam
    eos_t = torch.tensor(eos, device=device)

    fill = pad_id if pad_id else (eos[0] if eos else -1)
    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :T] = input_ids[:, None]
    finished_seqs = running.clone()
    finished_lens = torch.zeros((B, K), dtype=torch.long, device=device)
    running_scores = torch.zeros((B, K), device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: expand only the first
    finished_scores = torch.full((B, K), NEG, device=device)
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)

    mask = torch.ones((B * K, max_len), dtype=torch.long, device=device)
    mask[:, :T] = attention_mask.repeat_interleave(K, 0)
    padded = not bool(attention_mask.all())
    cache = KVCache.for_model(model, B * K, max_len)
    kernels = cpu_kernels.for_rows(B * K, device)
    procs = build_processors(config, T, sampling=False, attention_mask=mask[:, :T])
    flat = input_ids.repeat_interleave(K, 0)
    logits = model(flat, attention_mask=mask[:, :T] if padded else None, kv_cache=cache, logits_to_keep=1)[:, -1]
    cur = T
    while True:
        logp = apply_processors(procs, running.view(B * K, max_len)[:, :cur], logits.float().log_softmax(-1))
        V = logp.shape[-1]
        logp = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_idx = torch.topk(logp, keep)
        parent, token = cand_idx // V, cand_idx % V
        cand = _gather(running, parent)
        cand[:, :, cur] = token
        hits = torch.isin(token, eos_t) | (cur + 1 >= max_len)

        # the best K candidates that did not end keep running
        alive_scores = cand_scores + hits.float() * NEG
        nxt = torch.topk(alive_scores, K).indices
        running, running_scores = _gather(cand, nxt), _gather(alive_scores, nxt)
        running_parent = _gather(parent, nxt)

        # candidates that ended compete with the finished hypotheses on length-normalized score
        just_finished = hits & top_k_mask[None, :]
        norm = cand_scores / ((cur + 1 - T) ** lp)
        full = is_finished.all(-1, keepdim=True) & (early is True)
        norm = norm + full.float() * NEG + (~improvable).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat((finished_scores, norm), 1)
        best = torch.topk(merged_scores, K).indices
        finished_seqs = _gather(torch.cat((finished_seqs, cand), 1), best)
        finished_scores = _gather(merged_scores, best)
        is_finished = _gather(torch.cat((is_finished, just_finished), 1), best)
        cand_lens = torch.full_like(cand_scores, cur + 1 - T, dtype=torch.long)
        finished_lens = _gather(torch.cat((finished_lens, cand_lens), 1), best)

        cache.reorder((running_parent + torch.arange(B, device=device)[:, None] * K).view(-1))
        cur += 1
        # can a running beam still beat the worst finished one?
        best_len = (max_len - T) if (early == "never" and lp > 0) else (cur - T)
        best_running = running_scores[:, :1] / (best_len**lp)
        worst_done = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        all_done = bool(is_finished.all()) and early is True
        if not bool(improvable.any()) or all_done or bool(hits.all()):
            break
        step_ids = running[:, :, cur - 1].reshape(B * K, 1)
        with kernels:
            logits = model(step_ids, attention_mask=mask[:, :cur] if padded else None, kv_cache=cache, logits_to_keep=1)
        logits = logits[:, -1]

    n = config.num_return_sequences
    out = finished_seqs[:, :n].reshape(B * n, max_len)
    return out[:, : T + int(finished_lens[:, :n].max())]
