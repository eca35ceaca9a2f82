"""Look inside decoding: the model's candidates for the next token, and what temperature, top-k
and top-p each do to their probabilities (in the terminal and as a PNG)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.generate.config import GenerationConfig
from lmlab.generate.sampling import temperature as temperature_proc
from lmlab.generate.sampling import top_k as top_k_proc
from lmlab.generate.sampling import top_p as top_p_proc
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer


def show_token(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as readable text: its string in quotes, or its bytes when it is not whole UTF-8."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in raw) + ">"


@torch.inference_mode()
def top_next_tokens(model: Transformer, tokenizer: Tokenizer, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text` (already templated), as (shown text, probability).

    A token that is only part of a UTF-8 character (common for Chinese in byte-level BPE) is shown
    as its bytes, e.g. <e4 b8>, instead of a replacement character.
    """
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=next(model.parameters()).device)
    probs = model(ids, logits_to_keep=1)[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(show_token(tokenizer, j), float(q)) for q, j in zip(p.tolist(), i.tolist())]


@dataclass
class StepExplanation:
    """One decoding step: candidate tokens and their probability after each stage."""

    step: int
    tokens: list[str]  # the candidates, most likely first under the model
    stages: dict[str, list[float]]  # stage name -> probability of each candidate after it
    chosen: str


@torch.inference_mode()
def explain(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    config: GenerationConfig,
    steps: int = 3,
    k: int = 10,
) -> list[StepExplanation]:
    """Walk the first `steps` decoding steps and record how each warper reshapes the distribution."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    t = config.temperature if config.temperature > 0 else 1.0
    out = []
    for step in range(steps):
        logits = model(torch.tensor([ids], device=device), logits_to_keep=1)[0, -1].float()[None]
        none = torch.empty(0)
        stages = {"model": logits, f"temperature {t:g}": temperature_proc(t)(none, logits)}
        last = stages[f"temperature {t:g}"]
        if config.top_k > 0:
            last = stages[f"top-k {config.top_k}"] = top_k_proc(config.top_k)(none, last)
        if config.top_p < 1.0:
            last = stages[f"top-p {config.top_p:g}"] = top_p_proc(config.top_p)(none, last)
        probs = {name: s.softmax(-1)[0] for name, s in stages.items()}
        cand = probs["model"].topk(k).indices.tolist()
        final = probs[list(probs)[-1]]
        nxt = int(torch.multinomial(final, 1, generator=generator)) if config.sampling else int(final.argmax())
        tokens = [show_token(tokenizer, i) for i in cand]
        out.append(
            StepExplanation(
                step, tokens, {n: [float(p[i]) for i in cand] for n, p in probs.items()}, show_token(tokenizer, nxt)
            )
        )
        ids.append(nxt)
    return out


def format_explanation(steps: list[StepExplanation]) -> str:
    """A table per step: one row per candidate, one column per stage."""
    lines = []
    for s in steps:
        names = list(s.stages)
        lines.append(f"step {s.step + 1}: chose {s.chosen}")
        lines.append(f"  {'token':<14}" + "".join(f"{n:>16}" for n in names))
        for j, tok in enumerate(s.tokens):
            lines.append(f"  {tok[:14]:<14}" + "".join(f"{s.stages[n][j]:>16.1%}" for n in names))
    return "\n".join(lines)


def plot_explanation(steps: list[StepExplanation], path: str | os.PathLike) -> Path:
    """Grouped bars per step (candidates x stages), saved as a PNG."""
    from lmlab.viz.figure import pyplot, save_png

    fig, axes = pyplot().subplots(len(steps), 1, figsize=(11, 3.2 * len(steps)), squeeze=False)
    for ax, s in zip(axes[:, 0], steps):
        names = list(s.stages)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(s.tokens))]
            ax.bar(xs, s.stages[name], width=width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(s.tokens))])
        # non-ASCII as escapes: the default font has no CJK glyphs
        ax.set_xticklabels([t.encode("ascii", "backslashreplace").decode() for t in s.tokens], rotation=30, fontsize=8)
        ax.set_ylabel("probability")
        ax.set_title(f"step {s.step + 1}: chose {s.chosen.encode('ascii', 'backslashreplace').decode()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
