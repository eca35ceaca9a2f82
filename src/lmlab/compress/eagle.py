"""An EAGLE draft (Li et al. 2024): one decoder layer that reads the target's own hidden states.

A standalone draft has to rebuild from tokens what the target already computed; a few layers of a
30-layer model agree with it on about 40% of tokens. EAGLE's draft instead takes, at each position i,
the target's final hidden state f_i together with the embedding of the token that followed (x_{i+1}),

    h_i = Block(fc([f_i; embed(x_{i+1})]))      predicts f_{i+1}; lm_head(h_i) predicts x_{i+2}

and drafts further tokens by feeding its own predicted h back in place of f. Its embedding and LM head
are the target's (frozen), so its logits mean what the target's mean; the layer and `fc` are trained
on the target's hidden states of a corpus, cached once (`distill.cache_features`):

    loss = SmoothL1(h, f_next) + cls_weight * CE(softmax(lm_head(f_next)), log_softmax(lm_head(h)))

The cross-entropy's soft labels come from the target's own feature through the same head, so with a
reduced head (`reduce_head`) they are the target's distribution renormalized over the head's tokens.
`unroll` > 1 runs the draft again on its own predictions (after EAGLE-3's "training-time test"), so it
learns to keep going from its own guesses, as it must when drafting several tokens. (An approximation:
in a later pass every position reads predicted states, while when drafting only the current round's
positions do; EAGLE-3 masks attention so that earlier positions keep the first pass's keys.) The
embedding is frozen unless the recipe says `freeze_embeddings: false`; the head always is.

`generate.speculative.speculative_generate` runs such a draft (a Transformer with `cfg.eagle`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer


def eagle_draft(target: Transformer) -> Transformer:
    """A fresh one-layer EAGLE draft for `target`: its embedding, final norm and LM head copied from the
    target (the head untied, so `reduce_head` can cut it); the layer and `fc` newly initialized."""
    if target.lm_head is None or not target.cfg.causal:
        raise LmlabError("an EAGLE draft needs a causal target with an LM head", field="distill.student.eagle")
    t = target.cfg
    lists = {k: v[-1:] for k in ("layer_n_head", "layer_n_kv_head", "layer_d_ff") if (v := getattr(t, k)) is not None}
    cfg = dataclasses.replace(t, n_layer=1, eagle=True, tie_embeddings=False, head_tokens=None, **lists)
    device = next(target.parameters()).device
    draft = Transformer(cfg).to(device)
    with torch.no_grad():
        draft.embed.weight.copy_(target.embed.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        if draft.norm is not None:
            draft.norm.load_state_dict(target.norm.state_dict())
    return draft


def eagle_loss(draft: Transformer, features: torch.Tensor, tokens: torch.Tensor, cls_weight: float = 0.1,
               unroll: int = 1, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, top-1 agreement) of an EAGLE draft on a teacher-forced window.

    features (B, T, d): the target's hidden states after tokens[:, :T]; tokens (B, T + 1). Position i
    reads (features[:, i], tokens[:, i + 1]) and is scored against features[:, i + 1] and the target's
    next-token distribution there. Agreement: how often the draft's argmax is the target's among the
    head's tokens (first pass; with a reduced head, a position whose target token it lacks may count)."""
    f = features.float()
    inp, want = f[:, :-1], f[:, 1:]  # (B, T-1, d)
    ids = tokens[:, 1:-1]  # x_{i+1} for i < T - 1
    with torch.no_grad():  # the head is the target's (frozen): these are the target's own probabilities
        p = F.softmax(draft.lm_head(want).float(), -1)
    total, agree = f.new_zeros(()), None
    for step in range(unroll):
        x = inp + noise * torch.empty_like(inp).uniform_(-1, 1) if noise > 0 and draft.training else inp
        h = draft.hidden_states(ids, features=x)  # (B, T-1, d)
        logq = F.log_softmax(draft.lm_head(h).float(), -1)
        total = total + F.smooth_l1_loss(h.float(), want) - cls_weight * (p * logq).sum(-1).mean()
        if step == 0:
            agree = (logq.argmax(-1) == p.argmax(-1)).float().mean().detach()
        # the next pass reads at position i the draft's own prediction of f_i (made at i - 1)
        inp = torch.cat([f[:, :1], h[:, :-1]], 1)
    return total / unroll, agree


class EagleLoss:
    """The Trainer's loss for an EAGLE draft: features from the cache (training) or the live teacher."""

    def __init__(self, teacher: Transformer, features: torch.Tensor | None = None, cls_weight: float = 0.1,
                 unroll: int = 1, noise: float = 0.0) -> None:  # fmt: skip
        self.teacher, self.features = teacher, features
        self.cls_weight, self.unroll, self.noise = cls_weight, unroll, noise
        self.last_agreement: torch.Tensor | None = None  # (a tensor: reading it would sync a GPU each step)

    def __call__(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y, idx = batch
        tokens = torch.cat([x, y[:, -1:]], 1)  # the whole window
        if self.features is not None and model.training:
            feats = self.features[idx.cpu()].to(x.device)
        else:
            with torch.no_grad():
                feats = self.teacher.hidden_states(x)
        loss, agree = eagle_loss(model, feats, tokens, self.cls_weight, self.unroll, self.noise)
        self.last_agreement = agree
        return loss
