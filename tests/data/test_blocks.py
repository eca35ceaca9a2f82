"""Input blocks: every cut of a file yields the documents and file:line errors of reading it whole."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmlab.data.blocks import count_lines, default_block_bytes, number_blocks, plan_blocks, read_block
from lmlab.data.readers import read_file
from lmlab.errors import LmlabError


def _jsonl(path, n=400, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 97 == 5:
                f.write("\n")  # blank lines are skipped but still counted
            elif i % 101 == 7:
                f.write("{broken\n")
            elif i % 89 == 3:
                f.write(json.dumps({"other": 1}) + "\n")
            else:
                f.write(json.dumps({"text": "文字 words " * rng.randint(1, 60), "i": i}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": "no newline at the end"}))


def _docs(items):
    return [(x.file, x.line, x.text, x.fields) if not isinstance(x, LmlabError) else str(x) for x in items]


@pytest.mark.parametrize("block_bytes", [64, 1000, 7777, 10**9])
def test_jsonl_ranges_equal_whole_file(tmp_path, block_bytes):
    path = tmp_path / "a.jsonl"
    _jsonl(path)
    blocks = plan_blocks([path], block_bytes)
    blocks = number_blocks(blocks, [count_lines(b) for b in blocks])
    if block_bytes < 10**9:
        assert len(blocks) > 3
    assert [b.index for b in blocks] == list(range(len(blocks)))
    got = _docs(x for b in blocks for x in read_block(b, on_error="skip"))
    assert got == _docs(read_file(path, on_error="skip"))
    assert any(isinstance(x, str) and ":8: broken JSON" in x for x in got)


def test_first_error_raised_names_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    _jsonl(path)
    blocks = plan_blocks([path], 500)
    blocks = number_blocks(blocks, [count_lines(b) for b in blocks])
    with pytest.raises(LmlabError) as whole:
        list(read_file(path))
    with pytest.raises(LmlabError) as cut:
        for b in blocks:
            list(read_block(b))
    assert str(cut.value) == str(whole.value)


def test_parquet_row_groups_and_whole_files(tmp_path):
    rows = [{"text": f"row {i} " * (i % 7 + 1), "k": i} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=40)
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:50]))
    (tmp_path / "t.txt").write_text("para one\n\npara two\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    files = sorted(tmp_path.iterdir())
    blocks = plan_blocks(files, 2000)
    assert sum(1 for b in blocks if b.row_groups) > 2
    got = _docs(x for b in blocks for x in read_block(b, txt_unit="paragraph", on_error="skip"))
    ref = _docs(x for f in files for x in read_file(f, txt_unit="paragraph", on_error="skip"))
    assert got == ref
    assert any("empty file" in x for x in got if isinstance(x, str))


def test_block_size_policy():
    assert default_block_bytes(10**12, 64, 64) == 64_000_000  # a big corpus: the configured size
    assert default_block_bytes(100_000_000, 2, 64) == 12_500_001  # small: four blocks per worker
    assert default_block_bytes(1000, 2, 64) == 1 << 16  # tiny: not below 64 KB
    assert default_block_bytes(10**6, 2, 0.001) == 1000  # unless asked


def test_a_file_given_twice_restarts_its_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    _jsonl(path, n=120)
    blocks = plan_blocks([path, path], 900)
    blocks = number_blocks(blocks, [count_lines(b) for b in blocks])
    got = _docs(x for b in blocks for x in read_block(b, on_error="skip"))
    once = _docs(read_file(path, on_error="skip"))
    assert got == once + once


def test_a_broken_parquet_file_is_left_whole_for_the_reader_to_name(tmp_path):
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1" + bytes(range(256)) * 400)
    blocks = plan_blocks([bad], 1000)
    assert len(blocks) == 1 and blocks[0].whole
    with pytest.raises(LmlabError, match="cannot read parquet"):
        list(read_block(blocks[0]))
