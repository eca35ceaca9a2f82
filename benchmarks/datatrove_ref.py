"""Reference run of lmlab's default `data clean` pipeline in datatrove, for comparing MB/s and kept documents.

Runs in its own venv (not lmlab's): python -m venv /work/dtvenv && /work/dtvenv/bin/pip install
"datatrove[processing]==0.10.1" spacy orjson (spacy: datatrove's English word tokenizer; orjson: JsonlReader). Then:
    /work/dtvenv/bin/python benchmarks/datatrove_ref.py INPUT.jsonl --workers 2 --workdir DIR
and prints {"mb_per_s", "seconds", "docs_in", "docs_out", "datatrove_version"} as one JSON line on stdout.

Stages, each a LocalPipelineExecutor run (tasks=workers, workers=workers unless datatrove fixes the task count):
  A  JsonlReader -> Normalize (NFKC, control chars, whitespace) -> length -> GopherRepetitionFilter
     -> GopherQualityFilter (symbol ratio only) -> bad words -> PIIFormatter (email, IPv4)
     -> JsonlWriter -> ExactDedupSignature
  B  ExactFindDedups (1 task)
  C  JsonlReader -> ExactDedupFilter -> JsonlWriter -> MinhashDedupSignature
  D  MinhashDedupBuckets (one task per bucket)   E  MinhashDedupCluster (1 task)
  F  JsonlReader -> MinhashDedupFilter -> JsonlWriter (the output)
lmlab's language rule (script-based en/zh) has no offline datatrove counterpart (its LanguageFilter downloads
fastText's lid.176 model) and is left out; HTML stripping likewise (the benchmark input is plain text).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from contextlib import redirect_stdout
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LambdaFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

# lmlab DEFAULT_CONFIG values (src/lmlab/data/clean.py)
MIN_CHARS, MAX_CHARS = 20, 2_000_000
BAD_WORDS = ["viagra", "casino", "porn", "xxx", "赌博", "博彩", "色情", "代开发票", "六合彩"]
BAD_WORDS_MAX_FRACTION = 0.005
# lmlab's NearDedup: threshold 0.8, 128 permutations -> datasketch's optimizer gives 14 bands x 9 rows (126 used)
MINHASH = MinhashConfig(n_grams=3, num_buckets=14, hashes_per_bucket=9, seed=1)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_NON_WORD = re.compile(r"[\W_]+")
_BAD = re.compile(
    "|".join(
        re.escape(w) if re.search(r"[\u4e00-\u9fff]", w) else rf"\b{re.escape(w)}\b"
        for w in sorted(BAD_WORDS, key=len, reverse=True)
    ),
    re.I,
)


class Normalize(BaseFormatter):
    """lmlab's nfkc + control_chars + whitespace normalizers (no HTML stripping)."""

    name = "🔤 Normalize"

    def format(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        lines = (_SPACES.sub(" ", line).rstrip() for line in text.split("\n"))
        return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def length_ok(doc: Document) -> bool:
    return MIN_CHARS <= len(doc.text) <= MAX_CHARS


def bad_words_ok(doc: Document) -> bool:
    chars = sum(len(m) for m in _BAD.findall(doc.text))
    return chars / max(1, len(doc.text)) <= BAD_WORDS_MAX_FRACTION


def exact_content(doc: Document) -> str:
    """lmlab's exact_key input: lowercased text without punctuation, whitespace or underscores."""
    return _NON_WORD.sub("", doc.text.lower())


EXACT = ExactDedupConfig(content_getter=exact_content)


def _pad_ranks(folder: Path, tasks: int) -> None:
    """Each next stage reads rank r's file as its shard r: a rank that wrote no documents still needs a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        (folder / f"{rank:05d}.jsonl").touch()


def _split_input(src: Path, dest: Path, parts: int) -> None:
    """Contiguous line-aligned byte ranges, one file per task (datatrove shards by file, never within one)."""
    dest.mkdir(parents=True)
    size = src.stat().st_size
    with open(src, "rb") as f:
        for i in range(parts):
            end = size * (i + 1) // parts
            with open(dest / f"{i:05d}.jsonl", "wb") as out:
                while f.tell() < end or i == parts - 1:
                    chunk = f.readlines(1 << 16)
                    if not chunk:
                        break
                    out.writelines(chunk)


def _run(input_jsonl: str, workdir: str, tasks: int, workers: int) -> dict:
    src = Path(input_jsonl).resolve()
    root = Path(workdir).resolve() / "datatrove_ref"
    shutil.rmtree(root, ignore_errors=True)  # executors skip tasks they find completed in their logs
    root.mkdir(parents=True)
    d = {k: root / k for k in ("input", "filtered", "exact_sigs", "exact_dups", "unique", "mh_sigs", "mh_buckets")}
    d.update({k: root / k for k in ("mh_remove", "output", "logs")})
    with open(src, "rb") as f:
        docs_in = sum(1 for line in f if line.strip())

    def executor(pipeline: list, name: str, n: int | None = None) -> LocalPipelineExecutor:
        n = tasks if n is None else n
        return LocalPipelineExecutor(pipeline, tasks=n, workers=min(workers, n), logging_dir=str(d["logs"] / name))

    def writer(key: str) -> JsonlWriter:
        return JsonlWriter(str(d[key]), output_filename="${rank}.jsonl", compression=None)

    def reader(key: str) -> JsonlReader:
        return JsonlReader(str(d[key]), compression=None, glob_pattern="*.jsonl")

    start = time.perf_counter()
    if tasks > 1:
        _split_input(src, d["input"], tasks)
        first = reader("input")
    else:
        first = JsonlReader(str(src.parent), compression="infer", glob_pattern=src.name, recursive=False)
    executor(
        [
            first,
            Normalize(),
            LambdaFilter(length_ok),
            GopherRepetitionFilter(
                dup_line_frac=0.3,
                dup_para_frac=0.3,
                dup_line_char_frac=0.2,
                dup_para_char_frac=0.2,
                top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                dup_n_grams=(),
            ),
            GopherQualityFilter(
                min_doc_words=None,
                max_doc_words=None,
                min_avg_word_length=None,
                max_avg_word_length=None,
                max_symbol_word_ratio=0.1,
                max_bullet_lines_ratio=None,
                max_ellipsis_lines_ratio=None,
                max_non_alpha_words_ratio=None,
                min_stop_words=None,
            ),
            LambdaFilter(bad_words_ok),
            PIIFormatter(
                remove_emails=True,
                remove_ips=True,
                only_remove_public_ips=False,
                email_replacement="<EMAIL>",
                ip_replacement="<IP>",
            ),
            writer("filtered"),
            ExactDedupSignature(str(d["exact_sigs"]), config=EXACT, finder_workers=1),
        ],
        "a_filter",
    ).run()
    _pad_ranks(d["filtered"], tasks)
    executor([ExactFindDedups(str(d["exact_sigs"]), str(d["exact_dups"]), config=EXACT)], "b_exact_find", 1).run()
    executor(
        [
            reader("filtered"),
            ExactDedupFilter(str(d["exact_dups"]), config=EXACT),
            writer("unique"),
            MinhashDedupSignature(str(d["mh_sigs"]), config=MINHASH),
        ],
        "c_exact_filter",
    ).run()
    _pad_ranks(d["unique"], tasks)
    executor(
        [MinhashDedupBuckets(str(d["mh_sigs"]), str(d["mh_buckets"]), config=MINHASH)],
        "d_mh_buckets",
        MINHASH.num_buckets,
    ).run()
    executor([MinhashDedupCluster(str(d["mh_buckets"]), str(d["mh_remove"]), config=MINHASH)], "e_mh_cluster", 1).run()
    executor([reader("unique"), MinhashDedupFilter(str(d["mh_remove"])), writer("output")], "f_mh_filter").run()
    seconds = time.perf_counter() - start

    docs_out = 0
    for path in sorted(d["output"].glob("*.jsonl")):
        with open(path, "rb") as f:
            docs_out += sum(1 for line in f if line.strip())
    return {
        "mb_per_s": round(src.stat().st_size / 1e6 / seconds, 3),
        "seconds": round(seconds, 3),
        "docs_in": docs_in,
        "docs_out": docs_out,
        "datatrove_version": importlib.metadata.version("datatrove"),
    }


def run(input_jsonl: str, workdir: str, workers: int) -> dict:
    """Clean one JSONL file (field "text") with datatrove; output shards land in WORKDIR/datatrove_ref/output."""
    return _run(input_jsonl, workdir, workers, workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="JSONL file with a 'text' field")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    args = p.parse_args()
    with redirect_stdout(sys.stderr):  # datatrove's logs and stats go to stderr; stdout carries only the result
        result = run(args.input, args.workdir, args.workers)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
