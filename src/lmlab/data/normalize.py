"""Text normalization rules: Unicode NFKC, control characters, HTML/markup and whitespace."""

from __future__ import annotations

import html
import re
import unicodedata

# C0/C1 controls except tab and newline, plus zero-width and bidi marks that hide text
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# a tag: a known HTML element name after < or </, so "a < b" and "<3" in prose stay untouched
_TAG = re.compile(
    r"</?(?:a|abbr|b|blockquote|body|br|code|div|em|footer|h[1-6]|head|header|hr|html|i|img|li|link|meta|nav|ol|"
    r"p|pre|section|span|strong|sub|sup|table|tbody|td|th|thead|title|tr|u|ul|font|center|iframe|form|input|"
    r"button|label|select|option|article|aside|main|figure|figcaption|small|big|tt)\b[^<>]*>",
    re.I,
)
_BLOCK = re.compile(r"</?(?:p|div|br|li|tr|h[1-6]|blockquote|section|article|hr|table|ul|ol)\b[^<>]*>", re.I)
_ENTITY = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,7}|#x[0-9a-fA-F]{1,6});")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newline (NFKC has turned U+3000 etc. into spaces)
_BLANK_LINES = re.compile(r"\n{3,}")


# full-width punctuation is the norm in Chinese text: NFKC would turn "，" into ",", so these are kept as written
_CJK_PUNCT = re.compile("([，。！？：；（）～、《》「」『』【】〈〉])")


def nfkc(text: str) -> str:
    """Unicode NFKC (full-width letters and digits to ASCII, compatibility forms to plain ones), keeping CJK punctuation."""
    if text.isascii():
        return text
    parts = _CJK_PUNCT.split(text)  # odd indices are the kept punctuation marks
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))


def strip_control(text: str) -> str:
    """Remove control, zero-width and bidi-override characters (keep tab and newline)."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def strip_html(text: str) -> str:
    """Remove scripts, styles, comments and HTML tags (block tags become line breaks); unescape entities."""
    if "<" not in text and "&" not in text:
        return text  # fast path: most text has no markup
    text = _SCRIPT_STYLE.sub("", text)
    text = _COMMENT.sub("", text)
    text = _BLOCK.sub("\n", text)
    text = _TAG.sub("", text)
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def _line(line: str) -> str:
    body = line.lstrip(" \t")
    indent = line[: len(line) - len(body)]  # indentation carries meaning in code and verse: keep it
    return indent + _SPACES.sub(" ", body).rstrip()


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces inside lines, strip line ends, keep at most one blank line between paragraphs."""
    lines = [_line(line) for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n").rstrip()
