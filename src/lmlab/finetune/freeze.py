"""Layer freezing: train only part of a model (the seed's cheap fine-tuning), by readable patterns."""

from __future__ import annotations

import re

from torch import nn

from lmlab.errors import LmlabError

# names people use for the parts of a model, as prefixes of our parameter names
GROUPS = {
    "embeddings": ("embed.", "pos_embed.", "type_embed.", "embed_norm."),
    "head": ("lm_head.", "mlm_head.", "classifier."),
    "final_norm": ("norm.",),
    "pooler": ("pooler.",),
}


def _matcher(pattern: str, n_layer: int) -> tuple[str, ...]:
    """Parameter-name prefixes for one freeze pattern: a group, "layers.0-5", "layers.3" or a prefix."""
    if pattern in GROUPS:
        return GROUPS[pattern]
    m = re.fullmatch(r"layers\.(\d+)(?:-(\d+))?", pattern)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= n_layer:
            raise LmlabError(f"{pattern!r}: the model has layers 0-{n_layer - 1}", field="finetune.freeze")
        return tuple(f"layers.{i}." for i in range(lo, hi + 1))
    return (pattern,)


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter matched by `patterns`; returns the frozen names.

    Patterns: `embeddings`, `head`, `final_norm`, `pooler`, `layers.0-5` (inclusive), `layers.3`,
    or any prefix of parameter names (`layers.0.attn.`).
    """
    n_layer = getattr(getattr(model, "cfg", None), "n_layer", 0)
    frozen = []
    for pattern in patterns:
        prefixes = _matcher(str(pattern), n_layer)
        hits = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
        if not hits:
            raise LmlabError(f"{pattern!r} matches no parameter", field="finetune.freeze",
                             hint=f"groups: {', '.join(GROUPS)}; or layers.A-B")  # fmt: skip
        frozen += hits
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    # a tied head shares the embedding's tensor: freezing either freezes both, which is what tying means
    return sorted(set(frozen))


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": train, "total": total}
