"""Input blocks: files cut into pieces that many workers read in parallel, each yielding the same documents (and the
same file:line errors) as reading the whole file in order would.

A large uncompressed JSONL file is cut at line starts into byte ranges; a Parquet file into runs of row groups;
.txt and .jsonl.gz files stay whole (their documents span lines, or the stream cannot be entered in the middle).
Blocks are numbered in input order, so (block, position in block) orders every document the way the local engine
sees them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from lmlab.data.readers import Doc, _kind, _lines, _read_jsonl, _read_parquet, read_file
from lmlab.errors import LmlabError

READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class Block:
    """One piece of one input file: a byte range of lines (JSONL), a run of row groups (Parquet), or the whole file."""

    index: int  # position in input order
    file: str
    start: int = 0  # byte range [start, end) of a JSONL file, cut at line starts; end None = whole file
    end: int | None = None
    first_line: int = 1  # line number of the first line in the range (known after `count_lines`)
    row_groups: tuple[int, ...] | None = None  # Parquet: these row groups, whose first row is first_line
    bytes: int = 0  # for progress and scheduling

    @property
    def whole(self) -> bool:
        return self.end is None and self.row_groups is None


def _line_start_after(f, offset: int) -> int:
    """The first line start at or after offset (offset itself when the byte before it is a newline)."""
    f.seek(offset - 1)
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return f.tell()
        i = chunk.find(b"\n")
        if i >= 0:
            return f.tell() - len(chunk) + i + 1


def _parquet_meta(path: Path):
    """A Parquet file's metadata when it has rows to cut; None sends it to `read_file` whole, which raises the
    reader's own error for a broken file (in input order, as the local engine does) or reports an empty one once."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
    except Exception:
        return None
    return meta if meta.num_rows > 0 and meta.num_row_groups > 1 else None


def plan_blocks(files: list[Path], block_bytes: int) -> list[Block]:
    """Cut files into blocks of about block_bytes. JSONL ranges still need their first line numbers: `count_lines`
    gives each range's line count, and `number_blocks` turns the counts into first lines."""
    blocks: list[Block] = []
    for path in files:
        kind, size = _kind(path), path.stat().st_size
        if kind == ".jsonl" and size > block_bytes:
            with open(path, "rb") as f:
                cuts = sorted({_line_start_after(f, o) for o in range(block_bytes, size, block_bytes)} - {size})
            edges = [0, *cuts, size]
            for a, b in itertools.pairwise(edges):
                if b > a:
                    blocks.append(Block(len(blocks), str(path), a, b, bytes=b - a))
        elif kind == ".parquet" and size > block_bytes and (meta := _parquet_meta(path)) is not None:
            group: list[int] = []
            first = row = group_bytes = 0
            for g in range(meta.num_row_groups):
                group.append(g)
                group_bytes += meta.row_group(g).total_byte_size
                row += meta.row_group(g).num_rows
                if group_bytes >= block_bytes or g == meta.num_row_groups - 1:
                    blocks.append(Block(len(blocks), str(path), first_line=first + 1, row_groups=tuple(group),
                                        bytes=group_bytes))  # fmt: skip
                    group, first, group_bytes = [], row, 0
        else:
            blocks.append(Block(len(blocks), str(path), bytes=size))
    return blocks


def count_lines(block: Block) -> int:
    """Newlines in a JSONL block's byte range (the line count of every range but possibly the file's last)."""
    if block.end is None:
        return 0
    n, left = 0, block.end - block.start
    with open(block.file, "rb") as f:
        f.seek(block.start)
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def number_blocks(blocks: list[Block], counts: list[int]) -> list[Block]:
    """First line numbers of the JSONL ranges, from each range's newline count (a prefix sum per file)."""
    out, line = [], 1
    for block, count in zip(blocks, counts):
        if block.start == 0:  # a file's first range (also when a file is given twice)
            line = 1
        if block.end is not None:
            block = replace(block, first_line=line)
            line += count
        out.append(block)
    return out


def read_block(
    block: Block, text_field: str = "text", txt_unit: str = "file", on_error: str = "fail"
) -> Iterator[Doc | LmlabError]:
    """The documents of one block, with the errors `read_file` gives (raised, or yielded with on_error='skip')."""
    if block.whole:
        yield from read_file(block.file, text_field, txt_unit, on_error)
        return
    path = Path(block.file)
    if block.row_groups is not None:
        items = _read_parquet(path, text_field, list(block.row_groups), block.first_line - 1)
    else:
        items = _read_jsonl(path, text_field, _lines(path, block.start, block.end, block.first_line))
    for item in items:
        if isinstance(item, LmlabError) and on_error == "fail":
            raise item
        yield item


def block_files(blocks: list[Block]) -> list[str]:
    """The distinct input files, in order."""
    return list(dict.fromkeys(b.file for b in blocks))


def default_block_bytes(total_bytes: int, workers: int, block_mb: float) -> int:
    """Blocks of block_mb, smaller (down to 64 KB) when the input is too small to give every worker four."""
    return max(1, min(int(block_mb * 1e6), max(1 << 16, total_bytes // max(1, 4 * workers) + 1)))


__all__ = ["Block", "block_files", "count_lines", "default_block_bytes", "number_blocks", "plan_blocks", "read_block"]
