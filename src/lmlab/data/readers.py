"""Readers: stream documents from .txt, .jsonl, .jsonl.gz and .parquet files or folders, one at a time."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class Doc:
    """One document: its text, the other fields of its record, and where it came from (file, line)."""

    text: str
    file: str
    line: int
    fields: dict[str, Any] = field(default_factory=dict)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def list_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of readable files (folders are walked recursively)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) and not f.name.startswith("."))
            if not found:
                raise LmlabError(f"no {', '.join(SUFFIXES)} files in this folder", file=str(p))
            files.extend(found)
        elif p.is_file():
            if _kind(p) is None:
                raise LmlabError(f"unsupported file type; expected one of {', '.join(SUFFIXES)}", file=str(p))
            files.append(p)
        else:
            raise LmlabError("no such file or folder", file=str(p))
    return files


def _lines(
    path: Path, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, str | LmlabError]]:
    """Numbered lines of a UTF-8 (optionally gzipped) file; a line that is not UTF-8 comes as an error.

    start/end: only the lines that begin in this byte range (start must be a line start), numbered from first_line;
    how the Ray engine reads one large file in parallel pieces.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    n = 0
    with opener(path, "rb") as f:
        if start:
            f.seek(start)
        pos = start
        for n, raw in enumerate(f, first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    n,
                    LmlabError(
                        f"invalid UTF-8 (byte {e.start} of the line)", file=str(path), line=n, hint="re-encode as UTF-8"
                    ),
                )
    if n == 0 and start == 0 and end is None:
        yield 1, LmlabError("empty file", file=str(path), line=1, hint="remove it or give it content")


def _record(obj: Any, text_field: str, path: Path, n: int) -> Doc | LmlabError:
    if not isinstance(obj, dict):
        return LmlabError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), line=n)
    text = obj.get(text_field)
    if text is None:
        hint = f"fields here: {', '.join(list(obj)[:8])}; set text_field in the config"
        return LmlabError(f"missing field '{text_field}'", file=str(path), line=n, field=text_field, hint=hint)
    if not isinstance(text, str):
        return LmlabError(f"expected a string, got {type(text).__name__}", file=str(path), line=n, field=text_field)
    return Doc(text, str(path), n, {k: v for k, v in obj.items() if k != text_field})


def _read_txt(path: Path, unit: str) -> Iterator[Doc | LmlabError]:
    if unit == "line":
        for n, line in _lines(path):
            if isinstance(line, LmlabError):
                yield line
            elif line.strip():
                yield Doc(line.rstrip("\n"), str(path), n)
        return
    buf: list[str] = []
    start = 1
    for n, line in _lines(path):
        if isinstance(line, LmlabError):  # the document holding a bad line is dropped whole
            yield line
            buf, start = [], n + 1
            continue
        if unit == "paragraph" and not line.strip():
            if buf:
                yield Doc("".join(buf), str(path), start)
            buf, start = [], n + 1
            continue
        buf.append(line)
    if buf:
        yield Doc("".join(buf), str(path), start)


def _read_jsonl(path: Path, text_field: str, lines: Iterator | None = None) -> Iterator[Doc | LmlabError]:
    for n, line in lines if lines is not None else _lines(path):
        if isinstance(line, LmlabError):
            yield line
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield LmlabError(f"broken JSON line: {e.msg} at column {e.colno}", file=str(path), line=n)
            continue
        yield _record(obj, text_field, path, n)


def _read_parquet(
    path: Path, text_field: str, row_groups: list[int] | None = None, first_row: int = 0
) -> Iterator[Doc | LmlabError]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmlabError(
            "reading .parquet needs pyarrow", file=str(path), hint="pip install pyarrow (or lmlab[dev])"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's message says what is wrong with the file
        raise LmlabError(f"cannot read parquet: {e}", file=str(path)) from None
    if pf.metadata.num_rows == 0:
        yield LmlabError("empty file", file=str(path), line=1)
    row = first_row
    for batch in pf.iter_batches(batch_size=1024, row_groups=row_groups):  # row groups stream: memory stays flat
        for obj in batch.to_pylist():
            row += 1
            yield _record(obj, text_field, path, row)


def read_file(
    path: str | os.PathLike, text_field: str = "text", txt_unit: str = "file", on_error: str = "fail"
) -> Iterator[Doc | LmlabError]:
    """Stream the documents of one file (a .txt is one document per file, paragraph or line: `txt_unit`).

    Bad input (invalid UTF-8, broken JSON, a missing field, an empty file) raises an LmlabError naming file and line;
    with on_error="skip" the error is yielded in the document's place instead, for the caller to count.
    """
    if on_error not in ("fail", "skip"):
        raise LmlabError(f"on_error must be 'fail' or 'skip', not {on_error!r}", field="on_error")
    path = Path(path)
    kind = _kind(path)
    if kind == ".txt":
        items = _read_txt(path, txt_unit)
    elif kind in (".jsonl", ".jsonl.gz"):
        items = _read_jsonl(path, text_field)
    elif kind == ".parquet":
        items = _read_parquet(path, text_field)
    else:
        raise LmlabError("unsupported file type", file=str(path))
    for item in items:
        if isinstance(item, LmlabError) and on_error == "fail":
            raise item
        yield item


def read_documents(
    inputs: list[str | os.PathLike], text_field: str = "text", txt_unit: str = "file", on_error: str = "fail"
) -> Iterator[Doc | LmlabError]:
    """Stream the documents of files and folders, in sorted order (errors as in `read_file`)."""
    for f in list_files(inputs):
        yield from read_file(f, text_field, txt_unit, on_error)


def iter_texts(inputs: list[str | os.PathLike], text_field: str = "text", txt_unit: str = "file") -> Iterator[str]:
    """Just the texts of files and folders; bad input raises."""
    for doc in read_documents(inputs, text_field, txt_unit):
        assert isinstance(doc, Doc)
        yield doc.text
