"""Chunking: split a document into sections at its headings, then into windows of N tokens overlapping by M.

Each chunk keeps the heading path of its section ("json > Basic Usage") and its character offsets in the
document, so a citation can point back at the exact passage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer

_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:.])\1{2,}[ \t]*$")  # a line of one repeated punctuation character


@dataclass
class Chunk:
    """A passage of a document: its text, the heading path above it, and where it sits in the document."""

    chunk_id: str  # "DOC_ID#ORD"
    doc_id: str
    ord: int
    heading: str
    text: str
    start: int  # character offsets of `text` in the document
    end: int
    n_tokens: int

    @property
    def indexed_text(self) -> str:
        """What BM25 and the encoder see: the heading path, then the passage (the heading carries the topic)."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def sections(text: str) -> list[tuple[str, int, int]]:
    """(heading path, start, end) of each section; Markdown `#` headings and reST underlined (or overlined) titles."""
    lines = text.splitlines(keepends=True)
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)
    path: list[tuple[object, str]] = []  # (level key, title) from the top
    rst_styles: list[tuple[str, bool]] = []  # reST levels are the order in which title styles first appear
    out: list[tuple[str, int, int]] = []
    body_start, i = 0, 0

    def close(end: int) -> None:
        if text[body_start:end].strip():
            out.append((" > ".join(t for _, t in path), body_start, end))

    while i < len(lines):
        line = lines[i].rstrip("\r\n")
        nxt = lines[i + 1].rstrip("\r\n") if i + 1 < len(lines) else ""
        m = _MD_HEADING.match(line)
        level: object = None
        title, used = "", 0
        if m:
            level, title, used = ("md", len(m.group(1))), m.group(2).strip(), 1
        elif line.strip() and _RST_UNDERLINE.match(nxt) and len(nxt.rstrip()) >= len(line.rstrip()) >= 1:
            style = (nxt[0], False)
            if style not in rst_styles:
                rst_styles.append(style)
            level, title, used = ("rst", rst_styles.index(style)), line.strip(), 2
        elif _RST_UNDERLINE.match(line) and i + 2 < len(lines) and lines[i + 2].rstrip("\r\n") == line and nxt.strip():
            style = (line[0], True)  # overline + title + underline
            if style not in rst_styles:
                rst_styles.append(style)
            level, title, used = ("rst", rst_styles.index(style)), nxt.strip(), 3
        if level is None:
            i += 1
            continue
        close(starts[i])
        # a heading ends every open section at its own level or deeper; reST levels compare by first appearance
        while path and not _shallower(path[-1][0], level):
            path.pop()
        path.append((level, title))
        i += used
        body_start = starts[i] if i < len(lines) else len(text)
    close(len(text))
    return out


def _shallower(a: object, b: object) -> bool:
    """Whether heading level a sits above level b (Markdown and reST levels compared by depth)."""
    return a[1] < b[1]  # type: ignore[index]


def _widen(text: str, start: int, end: int, lo: int, hi: int) -> tuple[int, int]:
    """Move a window's edges out to whole words (a word-piece window may start inside a word), within [lo, hi]."""
    for _ in range(40):
        if start > lo and not text[start - 1].isspace():
            start -= 1
    for _ in range(40):
        if end < hi and not text[end].isspace():
            end += 1
    return start, end


def check_settings(chunk_tokens: int, overlap: int) -> None:
    """Chunk sizes that make sense: at least 8 tokens, an overlap smaller than a chunk."""
    if chunk_tokens < 8:
        raise LmlabError(f"chunk_tokens must be at least 8, got {chunk_tokens}", field="chunk_tokens")
    if not 0 <= overlap < chunk_tokens:
        raise LmlabError(f"overlap must be in [0, chunk_tokens), got {overlap}", field="overlap")


def chunk_document(
    doc_id: str, text: str, tokenizer: Tokenizer, chunk_tokens: int = 200, overlap: int = 40
) -> list[Chunk]:
    """Chunks of one document: windows of `chunk_tokens` tokens starting every `chunk_tokens - overlap`, per section."""
    check_settings(chunk_tokens, overlap)
    stride = chunk_tokens - overlap
    chunks: list[Chunk] = []
    for heading, s0, s1 in sections(text):
        body = text[s0:s1]
        enc = tokenizer.backend.encode(body, add_special_tokens=False)
        offsets = [o for o in enc.offsets if o[1] > o[0]]
        if not offsets:
            continue
        first = 0
        while True:
            window = offsets[first : first + chunk_tokens]
            start, end = _widen(body, window[0][0], window[-1][1], 0, len(body))
            piece = body[start:end]
            lead = len(piece) - len(piece.lstrip())
            piece = piece.strip()
            if piece:
                a = s0 + start + lead
                chunks.append(
                    Chunk(
                        f"{doc_id}#{len(chunks)}", doc_id, len(chunks), heading, piece, a, a + len(piece), len(window)
                    )
                )
            if first + chunk_tokens >= len(offsets):
                break
            first += stride
    return chunks
