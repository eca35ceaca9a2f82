"""Reading documents: ids, HTML text, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.rag.documents import html_to_text, read_documents


def test_ids_from_folders_files_and_jsonl(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("# A\n\nalpha\n")
    (tmp_path / "docs" / "sub" / "b.rst").write_text("beta\n")
    (tmp_path / "docs" / ".hidden.md").write_text("skip me\n")
    (tmp_path / "docs" / "notes.bin").write_bytes(b"\x00")
    rows = [{"id": "x1", "text": "one"}, {"path": "lib/y.rst", "text": "two"}, {"text": "three"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = read_documents([tmp_path / "docs", tmp_path / "d.jsonl"])
    assert [d.doc_id for d in docs] == ["a.md", "sub/b.rst", "x1", "lib/y.rst", "d.jsonl:3"]
    assert docs[0].text == "# A\n\nalpha\n"


def test_html_keeps_visible_text_and_headings(tmp_path):
    page = "<html><head><title>t</title><style>p {}</style></head><body><h1>Big  title</h1><p>Some\n<b>bold</b> text.</p><script>x()</script><h2>Next</h2><p>More.</p></body></html>"
    assert html_to_text(page) == "# Big title\n\nSome bold text.\n\n## Next\n\nMore.\n"
    (tmp_path / "p.html").write_text(page)
    assert read_documents([tmp_path / "p.html"])[0].text.startswith("# Big title")


def test_bad_inputs_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "latin1.md"
    bad.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(LmlabError, match=r"latin1\.md:2: not UTF-8 \(invalid continuation byte at byte 12\)"):
        read_documents([bad])
    with pytest.raises(LmlabError, match=r"missing\.md: no such file or folder"):
        read_documents([tmp_path / "missing.md"])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(LmlabError, match=r"x\.pdf: unsupported file type"):
        read_documents([tmp_path / "x.pdf"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match=r"empty: no \.txt"):
        read_documents([tmp_path / "empty"])
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(LmlabError, match=r"j\.jsonl:2: text: expected a string"):
        read_documents([tmp_path / "j.jsonl"])
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(LmlabError, match=r"dup\.jsonl:2: document id 'a' appears twice"):
        read_documents([tmp_path / "dup.jsonl"])
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    real = Path.read_bytes

    def deny(self):
        if self.name == "locked.txt":  # tests run as root, where chmod 000 does not stop reading
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(LmlabError, match=r"locked\.txt: cannot read this file \(Permission denied\)"):
        read_documents([locked])
