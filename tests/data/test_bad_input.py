"""Bad input names file and line; --on-error fail exits 1 and writes nothing, skip counts errors in the report."""

from __future__ import annotations

import gzip
import json

import pytest

from lmlab.cli import main
from lmlab.data.readers import read_documents
from lmlab.errors import LmlabError

GOOD = {"text": "A perfectly ordinary sentence about the weather, which was mild and sunny all week."}


def write_jsonl(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.fixture
def cases(tmp_path):
    good = json.dumps(GOOD).encode()
    files = {
        "utf8": (tmp_path / "bad_utf8.jsonl", [good, b'{"text": "caf\xe9 au lait"}'], 2, "invalid UTF-8"),
        "json": (tmp_path / "broken.jsonl", [good, good, b'{"text": "unterminated'], 3, "broken JSON"),
        "field": (tmp_path / "nofield.jsonl", [good, json.dumps({"content": "x"}).encode()], 2, "missing field 'text'"),
        "empty": (tmp_path / "empty.jsonl", [], 1, "empty file"),
    }
    for path, lines, _, _ in files.values():
        write_jsonl(path, lines) if lines else path.write_bytes(b"")
    return files


@pytest.mark.parametrize("kind", ["utf8", "json", "field", "empty"])
def test_message_names_file_and_line(cases, kind):
    path, _, line, message = cases[kind]
    with pytest.raises(LmlabError) as e:
        list(read_documents([path]))
    assert str(e.value).startswith(f"{path}:{line}: ") and message in str(e.value)


def test_invalid_utf8_in_txt_and_gzip(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_bytes("第一行\n".encode() + b"\xff\xfe broken\n")
    with pytest.raises(LmlabError, match=rf"{txt}:2: invalid UTF-8"):
        list(read_documents([txt]))
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(json.dumps(GOOD).encode() + b"\n{oops\n"))
    with pytest.raises(LmlabError, match=rf"{gz}:2: broken JSON"):
        list(read_documents([gz]))


@pytest.mark.parametrize("kind", ["utf8", "json", "field", "empty"])
def test_cli_fail_exits_1_and_writes_nothing(cases, kind, tmp_path, capsys):
    path, _, line, message = cases[kind]
    out = tmp_path / f"out_{kind}"
    assert main(["data", "clean", str(path), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lmlab: error: {path}:{line}: ") and message in err[-1]
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_skip_counts_errors(cases, tmp_path):
    out = tmp_path / "out"
    inputs = [str(p) for p, *_ in cases.values()]
    assert main(["data", "clean", *inputs, "--out", str(out), "--on-error", "skip", "--workers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["errors_skipped"] == 4
    assert report["docs_in"] == 4  # the good lines: 1 + 2 + 1
    assert report["docs_out"] == 1  # the same sentence four times: exact dedup keeps one
    assert report["rules"]["exact_dedup"]["docs"] == 3


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # pyarrow is a dev extra; the message without it is tested below
    import pyarrow as pa

    path = tmp_path / "x.parquet"
    pq.write_table(
        pa.table({"text": [GOOD["text"], "第二篇文章的内容，讲述了一个关于春天的故事。"], "id": [1, 2]}), path
    )
    docs = list(read_documents([path]))
    assert [d.fields["id"] for d in docs] == [1, 2] and docs[1].line == 2
