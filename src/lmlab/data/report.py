"""The cleaning report: per rule, documents and characters removed (or changed) and a few examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 3
EXAMPLE_CHARS = 160


@dataclass
class RuleStats:
    """What one rule did: documents and characters it removed or changed, and examples."""

    action: str = "removed"  # removed, changed or masked
    docs: int = 0
    chars: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, chars: int, where: str, reason: str, text: str) -> None:
        self.docs += 1
        self.chars += chars
        if len(self.examples) < MAX_EXAMPLES:
            snippet = text[:EXAMPLE_CHARS] + ("..." if len(text) > EXAMPLE_CHARS else "")
            self.examples.append({"where": where, "reason": reason, "text": snippet})


@dataclass
class Report:
    """Totals in and out, rule by rule, in pipeline order, plus bad-input errors skipped."""

    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    rules: dict[str, RuleStats] = field(default_factory=dict)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def rule(self, name: str, action: str = "removed") -> RuleStats:
        if name not in self.rules:
            self.rules[name] = RuleStats(action)
        return self.rules[name]

    def add_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(message)

    def merge(self, part: dict[str, Any]) -> None:
        """Add the counts of a report made on a later part of the input (its `to_dict`): totals add up, examples
        keep the first ones in input order, as one report over the whole input would. Merge parts in input order."""
        self.docs_in += part["docs_in"]
        self.chars_in += part["chars_in"]
        self.docs_out += part["docs_out"]
        self.chars_out += part["chars_out"]
        self.errors += part["errors_skipped"]
        self.error_examples.extend(part["error_examples"][: 10 - len(self.error_examples)])
        for name, r in part["rules"].items():
            stats = self.rule(name, r["action"])
            stats.docs += r["docs"]
            stats.chars += r["chars"]
            stats.examples.extend(r["examples"][: MAX_EXAMPLES - len(stats.examples)])
            for kind, n in r.get("counts", {}).items():
                stats.counts[kind] = stats.counts.get(kind, 0) + n

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written as report.json."""
        return {
            "docs_in": self.docs_in,
            "chars_in": self.chars_in,
            "docs_out": self.docs_out,
            "chars_out": self.chars_out,
            "errors_skipped": self.errors,
            "error_examples": self.error_examples,
            "rules": {
                name: {
                    "action": r.action,
                    "docs": r.docs,
                    "chars": r.chars,
                    **({"counts": r.counts} if r.counts else {}),
                    "examples": r.examples,
                }
                for name, r in self.rules.items()
            },
        }

    def table(self) -> str:
        """A console table: one row per rule."""
        rows = [("rule", "docs", "% docs", "chars", "% chars")]
        for name, r in self.rules.items():
            rows.append(
                (f"{name} ({r.action})", f"{r.docs:,}", f"{100 * r.docs / max(1, self.docs_in):.1f}", f"{r.chars:,}",
                 f"{100 * r.chars / max(1, self.chars_in):.1f}")
            )  # fmt: skip
        rows.append(("bad input skipped", f"{self.errors:,}", "", "", ""))
        rows.append(("in", f"{self.docs_in:,}", "100.0", f"{self.chars_in:,}", "100.0"))
        rows.append(
            ("out", f"{self.docs_out:,}", f"{100 * self.docs_out / max(1, self.docs_in):.1f}", f"{self.chars_out:,}",
             f"{100 * self.chars_out / max(1, self.chars_in):.1f}")
        )  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)
