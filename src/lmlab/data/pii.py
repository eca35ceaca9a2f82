"""PII masking: e-mail addresses, phone numbers, Chinese resident ID numbers, IPv4 addresses and card numbers."""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# 18-character resident ID: 6-digit area, birth date 18xx-20xx, 3-digit sequence, check digit (0-9 or X)
CN_ID = re.compile(
    r"(?<![\dA-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])"
)
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]|\.\d)"
)
# Chinese mobile: 11 digits starting 13-19, optionally +86, optionally grouped 3-4-4
CN_MOBILE = re.compile(r"(?<![\d+])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
# other phones: a separated group structure, so plain numbers, years and verse references are left alone
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-]|[ .]\d)"
    r"|(?<![\w+])\+\d{1,3}[ .-]?\d{6,12}(?!\w)"
)
MASKS = {"email": "<EMAIL>", "cn_id": "<ID>", "card": "<CARD>", "ipv4": "<IP>", "phone": "<PHONE>"}
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_valid(s: str) -> bool:
    """GB 11643 check digit of an 18-character Chinese resident ID number."""
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment card numbers."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


_CHECKS = {"cn_id": lambda m: cn_id_valid(m.group(0)), "card": _card}
_PATTERNS = {"email": EMAIL, "cn_id": CN_ID, "card": CARD, "ipv4": IPV4, "phone": (CN_MOBILE, PHONE)}


def mask_pii(text: str, kinds: list[str] | None = None) -> tuple[str, Counter]:
    """Replace PII with placeholders like <EMAIL>; returns the new text and how many of each kind were masked.

    Order matters: ID and card numbers (checksummed) go before phones, so a long digit run is classified once.
    """
    counts: Counter = Counter()
    for kind in kinds or list(MASKS):
        patterns = _PATTERNS[kind]
        check = _CHECKS.get(kind)
        for pattern in patterns if isinstance(patterns, tuple) else (patterns,):

            def replace(m: re.Match, kind: str = kind, check=check) -> str:
                if check is not None and not check(m):
                    return m.group(0)
                counts[kind] += 1
                return MASKS[kind]

            text = pattern.sub(replace, text)
    return text, counts
