"""The short text report `lmlab align` prints: what was measured before and after, and where the run is."""

from __future__ import annotations

from typing import Any

SHOWN = ("accuracy", "margin", "pass_rate", "rm_score", "val_reward_accuracy", "val_reward_margin", "val_dpo_loss")


def _value(m: dict[str, Any], key: str) -> str | None:
    if key not in m or m[key] is None:
        return None
    se = m.get(f"{key}_se")
    return f"{m[key]:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else "")


def format_summary(summary: dict[str, Any]) -> str:
    """Before/after lines for the method's measurements, sample answers, and the output paths."""
    lines = [f"method: {summary['method']}"]
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for key in SHOWN:
        k = "val_" + key if summary["method"] == "rm" else key
        a, b = _value(before, k), _value(after, k)
        if a is not None or b is not None:
            lines.append(f"  {k:22s} before {a or '-':>20s}   after {b or '-':>20s}")
    if summary["method"] == "rm":
        lines.append("  (chance accuracy: 0.5)")
    for key, c in (summary.get("change") or {}).items():
        lines.append(f"  {key} after - before (same prompts): {c['diff']:+.4f}, paired-bootstrap 95% CI "
                     f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")  # fmt: skip
    for title, m in (("before", before), ("after", after)):
        for s in (m.get("samples") or [])[:3]:
            lines.append(f"  [{title}] {s['prompt'][:60]!r} -> {s['answer'][:80]!r}")
    lines.append(f"model: {summary.get('model')}; curves: {summary.get('curves')}; metrics: "
                 f"{summary.get('out_dir')}/metrics.jsonl")  # fmt: skip
    return "\n".join(lines) + "\n"
