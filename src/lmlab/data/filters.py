"""Quality filters: each returns None to keep a document, or a short reason to drop it."""

from __future__ import annotations

import functools
import re
from collections import Counter

from lmlab.data.language import HAN, detect_language, words


def length_filter(text: str, min_chars: int = 0, max_chars: int | None = None) -> str | None:
    """Drop documents shorter than min_chars or longer than max_chars characters."""
    if len(text) < min_chars:
        return f"shorter than {min_chars} chars"
    if max_chars is not None and len(text) > max_chars:
        return f"longer than {max_chars} chars"
    return None


def language_filter(text: str, keep: list[str], min_fraction: float = 0.5) -> str | None:
    """Keep documents whose dominant script is a kept language and covers at least min_fraction of letters."""
    lang, frac = detect_language(text)
    if lang not in keep:
        return f"language {lang}"
    if frac < min_fraction:
        return f"{lang} is only {frac:.0%} of letters"
    return None


def _dup_fraction(parts: list[str]) -> tuple[float, float]:
    """Fraction of parts, and of their characters, that repeat an earlier part (Gopher)."""
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for p in parts:
        total_chars += len(p)
        if p in seen:
            dup_n += 1
            dup_chars += len(p)
        seen.add(p)
    return dup_n / max(1, len(parts)), dup_chars / max(1, total_chars)


def _top_ngram_fraction(ws: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters (Gopher)."""
    if len(ws) < n:
        return 0.0
    grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in ws))


def repetition_filter(
    text: str,
    max_dup_line_fraction: float = 0.3,
    max_dup_line_char_fraction: float = 0.2,
    max_dup_para_fraction: float = 0.3,
    max_dup_para_char_fraction: float = 0.2,
    max_top_ngram_fraction: dict[int, float] | None = None,
) -> str | None:
    """Gopher repetition rules: repeated lines and paragraphs, and one n-gram covering too much of the text."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    frac, char_frac = _dup_fraction(lines)
    if frac > max_dup_line_fraction or char_frac > max_dup_line_char_fraction:
        return f"duplicate lines {frac:.0%} ({char_frac:.0%} of chars)"
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, char_frac = _dup_fraction(paras)
    if frac > max_dup_para_fraction or char_frac > max_dup_para_char_fraction:
        return f"duplicate paragraphs {frac:.0%} ({char_frac:.0%} of chars)"
    ws = words(text.lower())
    for n, limit in sorted((max_top_ngram_fraction or {2: 0.2, 3: 0.18, 4: 0.16}).items()):
        frac = _top_ngram_fraction(ws, int(n))
        if frac > limit:
            return f"top {n}-gram covers {frac:.0%}"
    return None


_SYMBOLS = re.compile(r"#|\.\.\.|…|……")


def symbol_filter(text: str, max_symbol_word_ratio: float = 0.1) -> str | None:
    """Gopher: drop documents with more than max_symbol_word_ratio hash signs or ellipses per word."""
    n_words = len(words(text))
    n_symbols = len(_SYMBOLS.findall(text))
    if n_words == 0 or n_symbols / n_words > max_symbol_word_ratio:
        return f"{n_symbols} symbols for {n_words} words"
    return None


@functools.lru_cache(maxsize=8)
def _compile(bad_words: tuple[str, ...]) -> re.Pattern | None:
    parts = []
    for w in sorted({w.strip().lower() for w in bad_words if w.strip()}, key=len, reverse=True):
        if re.search(f"[{HAN}]", w):
            parts.append(re.escape(w))  # Chinese has no word boundaries to anchor on
        else:
            parts.append(rf"\b{re.escape(w)}\b")
    return re.compile("|".join(parts), re.I) if parts else None


def compile_bad_words(bad_words: list[str]) -> re.Pattern | None:
    """One regex for a bad-word list: whole words for alphabetic scripts, substrings for Chinese (cached)."""
    return _compile(tuple(bad_words))


def bad_words_filter(text: str, pattern: re.Pattern | None, max_fraction: float = 0.005) -> str | None:
    """Drop documents where bad words cover more than max_fraction of the characters."""
    if pattern is None:
        return None
    hits = pattern.findall(text)
    chars = sum(len(h) for h in hits)
    if hits and chars / max(1, len(text)) > max_fraction:
        return f"bad words {', '.join(sorted(set(h.lower() for h in hits))[:3])}"
    return None
