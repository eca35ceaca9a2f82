"""Documents to index: JSONL records, text/Markdown/reST/HTML files or folders, or a fetched corpus, each with a stable id."""

from __future__ import annotations

import html.parser
import os
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.finetune.task_data import iter_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = (*TEXT_SUFFIXES, *HTML_SUFFIXES, ".jsonl")


@dataclass
class Document:
    """One document: a stable id (the key for update and delete), its text and where it came from."""

    doc_id: str
    text: str
    source: str  # file (and line for JSONL), or corpus name


def _read_utf8(path: Path) -> str:
    """A whole file as UTF-8, or one clear error naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:  # permission denied, a device, a vanished file
        raise LmlabError(f"cannot read this file ({e.strerror or e})", file=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LmlabError(
            f"not UTF-8 ({e.reason} at byte {e.start})", file=str(path), line=line, hint="re-encode the file as UTF-8"
        ) from None


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; h1-h6 become Markdown headings so the chunker keeps them."""

    SKIP = frozenset({"script", "style", "head", "noscript", "template"})
    BLOCK = frozenset({"p", "div", "li", "tr", "br", "pre", "section", "article", "table", "ul", "ol", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data if self.parts and self.parts[-1].startswith("#") else data.replace("\n", " "))


def html_to_text(raw: str) -> str:
    """Visible text of an HTML document, headings as `# title` lines; offsets refer to this text, not the HTML."""
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
    text, blank = [], False
    for line in lines:  # at most one blank line in a row
        if line or not blank:
            text.append(line)
        blank = not line
    return "\n".join(text).strip() + "\n"


def _jsonl_documents(path: Path, text_field: str = "text") -> list[Document]:
    docs = []
    for n, obj in iter_jsonl(path):
        text = obj.get(text_field)
        if not isinstance(text, str):
            raise LmlabError(f"expected a string, got {type(text).__name__}", file=str(path), line=n, field=text_field)
        # a stable id: the record's own id or path; else the line number, which moves if lines are inserted
        doc_id = obj.get("id", obj.get("doc_id", obj.get("path")))
        docs.append(Document(str(doc_id) if doc_id is not None else f"{path.name}:{n}", text, f"{path}:{n}"))
    return docs


def _file_documents(path: Path, doc_id: str) -> list[Document]:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return _jsonl_documents(path)
    text = _read_utf8(path)
    if name.endswith(HTML_SUFFIXES):
        text = html_to_text(text)
    return [Document(doc_id, text, str(path))]


def _corpus_documents(name: str) -> list[Document]:
    """A corpus from `lmlab data fetch NAME`: every split, ids from its records' id or path fields."""
    from lmlab.data.registry import SPLITS, fetch

    folder = fetch(name)
    docs = []
    for split in SPLITS:
        for d in _jsonl_documents(folder / f"{split}.jsonl"):
            if d.doc_id.startswith(f"{split}.jsonl:"):
                d.doc_id = f"{name}/{d.doc_id}"
            docs.append(d)
    return docs


def read_documents(inputs: list[str | os.PathLike]) -> list[Document]:
    """All documents of `inputs`, read and checked before anything is written (a bad file fails the whole run).

    An input is a .jsonl file (a `text` field; id from `id`, `doc_id` or `path`, else FILE:LINE), a text, Markdown,
    reST or HTML file (id: its name), a folder of those (id: the path inside the folder), or the name of a corpus
    that `lmlab data fetch` knows (e.g. python-docs).
    """
    from lmlab.data.registry import DATASETS

    docs: list[Document] = []
    for item in inputs:
        p = Path(item)
        if not p.exists() and str(item) in DATASETS:
            docs += _corpus_documents(str(item))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES))
            files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(p).parts)]
            if not files:
                raise LmlabError(f"no {', '.join(SUFFIXES)} files in this folder", file=str(p))
            for f in files:
                docs += _file_documents(f, f.relative_to(p).as_posix())
        elif p.is_file():
            if not p.name.lower().endswith(SUFFIXES):
                raise LmlabError(f"unsupported file type; expected one of {', '.join(SUFFIXES)}", file=str(p))
            docs += _file_documents(p, p.name)
        else:
            hint = f"or a corpus name: {', '.join(DATASETS)}"
            raise LmlabError("no such file or folder", file=str(p), hint=hint)
    seen: dict[str, str] = {}
    for d in docs:
        if d.doc_id in seen:
            raise LmlabError(f"document id {d.doc_id!r} appears twice (also in {seen[d.doc_id]})", file=d.source)
        seen[d.doc_id] = d.source
    return docs
