"""What a fine-tuning run prints: before/after, held-out metrics with error bars, samples, where files went."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _noise_line(n: dict[str, Any]) -> str:
    return f"label noise: {n['flagged']} of {n['of']} training examples flagged ({n['probabilities']}): {n['file']}"


def format_summary(s: dict[str, Any]) -> str:
    """A short human-readable report of a `finetune` or `cross_validate` summary."""
    lines: list[str] = []
    if "k" in s and "per_fold" in s:  # cross-validation
        lines.append(f"{s['k']}-fold cross-validation (fold sizes {s['folds']})")
        for name, m in s["metrics"].items():
            lines.append(f"  {name:<20} {m['mean']:.4f} ± {m['std']:.4f}  (folds: {', '.join(f'{v:.4f}' for v in m['values'])})")  # fmt: skip
        if s.get("label_noise"):
            lines.append(_noise_line(s["label_noise"]))
        lines.append(f"folds under {s['out_dir']}")
        return "\n".join(lines) + "\n"
    p = s["parameters"]
    lines.append(f"{s['task']} / {s['method']}: {p['trainable']:,} of {p['total']:,} parameters trained, "
                 f"{s['train']['steps']} steps")  # fmt: skip
    if "data" in s:
        d = s["data"]
        lines.append(f"data: {d['examples']} examples, {d['truncated']} truncated, "
                     f"packing efficiency {d['packing_efficiency']:.1%}")  # fmt: skip
    before, after = s.get("before", {}), s.get("after", {})
    keys = [k for k in after if k != "answers"]
    if keys:
        lines.append("validation:")
        for k in keys:
            b = before.get(k)
            lines.append(f"  {k:<20} {_fmt(b) if b is not None else '-':>8} -> {_fmt(after[k])}")
    test = s.get("test") or {}
    if "ece" in test:  # classification (entity scores carry a token accuracy too)
        lines.append(f"test (n={test['n']}): accuracy {test['accuracy']:.4f} ± {test['accuracy_se']:.4f}, "
                     f"macro-F1 {test['macro']['f1']:.4f} ± {test['macro']['f1_se']:.4f}, ECE {test['ece']:.4f}")  # fmt: skip
        lines.append(f"  plots: {', '.join(test.get('plots', []))}")
    elif "f1" in test:
        lines.append(
            f"test: entity precision {test['precision']:.4f}, recall {test['recall']:.4f}, F1 {test['f1']:.4f}"
        )
        for t, m in sorted(test.get("per_type", {}).items()):
            lines.append(f"  {t:<6} F1 {m['f1']:.4f} (support {m['support']})")
    if before.get("answers"):
        lines.append("answers before -> after:")
        for q, (a, b) in zip(s.get("prompts", []) or [""] * len(before["answers"]),
                             zip(before["answers"], after.get("answers", []))):  # fmt: skip
            lines.append(f"  Q: {q}\n    before: {a[:160]!r}\n    after:  {b[:160]!r}")
    if s.get("label_noise"):
        lines.append(_noise_line(s["label_noise"]))
    lines.append(f"model: {s['model']}  (curves: {s['train'].get('plot')})")
    return "\n".join(lines) + "\n"
