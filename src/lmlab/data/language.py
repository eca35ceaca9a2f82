"""Scripts and languages by character classes: which writing system a text is in, and its words."""

from __future__ import annotations

import re
from collections import Counter

# Han ideographs: the BMP blocks, compatibility ideographs and the supplementary planes (rare CJK like 𠀀)
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# a word is one Han character (Chinese has no spaces) or a run of other letters/digits
WORD = re.compile(rf"[{HAN}]|[^\W{HAN}]+")

# script -> language code; a text's language is its most common script among letters
_SCRIPTS = [
    (re.compile(rf"[{HAN}]"), "zh"),
    (re.compile(r"[a-zA-Z\u00c0-\u024f]"), "en"),  # Latin: English is the Latin language lmlab ships data for
    (re.compile(r"[\u3040-\u30ff]"), "ja"),
    (re.compile(r"[\uac00-\ud7af\u1100-\u11ff]"), "ko"),
    (re.compile(r"[\u0400-\u04ff]"), "ru"),
    (re.compile(r"[\u0600-\u06ff]"), "ar"),
    (re.compile(r"[\u0900-\u097f]"), "hi"),
    (re.compile(r"[\u0370-\u03ff]"), "el"),
]


def words(text: str) -> list[str]:
    """Words of a text: Han characters one by one, other scripts by runs of word characters."""
    return WORD.findall(text)


def script_counts(text: str) -> Counter:
    """Letters per language code (zh, en, ja, ko, ru, ar, hi, el)."""
    counts: Counter = Counter()
    for pattern, lang in _SCRIPTS:
        n = len(pattern.findall(text))
        if n:
            counts[lang] += n
    return counts


def detect_language(text: str) -> tuple[str, float]:
    """The dominant language by script and the fraction of letters in it; ("unknown", 0.0) without letters.

    Japanese mixes kana with Han, so any kana share over 10% makes a Han-heavy text Japanese.
    """
    counts = script_counts(text)
    total = sum(counts.values())
    if total == 0:
        return "unknown", 0.0
    if counts["ja"] > 0.1 * total:
        return "ja", (counts["ja"] + counts["zh"]) / total
    lang, n = counts.most_common(1)[0]
    return lang, n / total
