"""A held-out QA set over the Python documentation, built reproducibly without a larger model.

The knowledge base is the library reference pages whose names start with j to r (`KB_PATTERN`: json, logging,
math, os, pathlib, pickle, random, re, ...). Questions come from four sources:
- templates over structured fields: a module's `:synopsis:` ("which module ...?") and a function's
  `.. versionadded::` ("in which Python version was X added?");
- cloze questions over prose sentences: one ``literal`` blanked out;
- paraphrased questions written by hand (PARAPHRASED) that avoid the passage's words; each answer is checked
  to appear on its page when the set is built;
- unanswerable questions: the versionadded template over pages outside the knowledge base, for names no
  knowledge-base page mentions.
Rows are split into dev (30%) and test (70%) by a hash of the question, like `lmlab data fetch`.
"""

from __future__ import annotations

import fnmatch
import os
import random
import re
from pathlib import Path
from typing import Any

from lmlab.data.registry import split_of
from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_text

KB_PATTERN = "library/[j-r]*"
CORPUS = "python-docs"

# hand-written paraphrases: (question, answers, pages); the words avoid the passage's own where possible
PARAPHRASED: list[tuple[str, list[str], list[str]]] = [
    ("Which function gives the length of the longest side of a right-angled triangle from the other two sides?",
     ["math.hypot", "hypot"], ["library/math.rst.txt"]),
    ("How do I pick one element at random out of a non-empty list?", ["random.choice", "choice"],
     ["library/random.rst.txt"]),
    ("Which call reorders the items of a list randomly, changing the list itself?", ["random.shuffle", "shuffle"],
     ["library/random.rst.txt"]),
    ("Which function tells me if a filesystem location is an existing folder?", ["os.path.isdir", "isdir", "is_dir"],
     ["library/os.path.rst.txt", "library/pathlib.rst.txt"]),
    ("What exception do I get when I ask a queue for an item without waiting and nothing is there?",
     ["queue.Empty", "Empty"], ["library/queue.rst.txt"]),
    ("Which math function finds the largest whole number that divides all of its integer inputs?",
     ["math.gcd", "gcd"], ["library/math.rst.txt"]),
    ("How many characters wide is a pretty-printer's output allowed to be unless told otherwise?", ["80"],
     ["library/pprint.rst.txt"]),
    ("Which regex flag lets the dot also match line breaks?", ["re.DOTALL", "DOTALL", "re.S"],
     ["library/re.rst.txt"]),
    ("How can a program learn the name of the OS it runs on, such as Linux or Darwin?",
     ["platform.system", "system"], ["library/platform.rst.txt"]),
    ("Which function of the operator module performs the plus operation on two numbers?", ["operator.add", "add"],
     ["library/operator.rst.txt"]),
    ("How do I look up a user account record by its numeric identifier on Unix?", ["pwd.getpwuid", "getpwuid"],
     ["library/pwd.rst.txt"]),
    ("Which constant holds the ratio of a circle's circumference to its diameter?", ["math.pi", "pi"],
     ["library/math.rst.txt"]),
    ("Which random function draws from the bell-curve distribution with a given mean and spread?",
     ["random.gauss", "gauss", "random.normalvariate", "normalvariate"], ["library/random.rst.txt"]),
    ("Which method of a filesystem path object makes a new folder there?", ["mkdir", "Path.mkdir"],
     ["library/pathlib.rst.txt"]),
    ("Which function turns a Python object into a JSON-formatted str?", ["json.dumps", "dumps"],
     ["library/json.rst.txt"]),
    ("Which function reads a serialized object back from a bytes value in the pickle module?",
     ["pickle.loads", "loads"], ["library/pickle.rst.txt"]),
    ("How do I get the process id of the currently running program?", ["os.getpid", "getpid"],
     ["library/os.rst.txt"]),
    ("Which function returns the next float in the half-open range from zero up to one?",
     ["random.random", "random"], ["library/random.rst.txt"]),
]  # fmt: skip

_MODULE = re.compile(r"^\.\. module:: (\S+)\s*\n((?:[ \t]+:\w+:.*\n)*)", re.M)
_SYNOPSIS = re.compile(r":synopsis:\s*(.+)")
_DIRECTIVE = re.compile(r"^\.\. (function|class|exception|data|decorator):: ([\w.]+)", re.M)
_VERSIONADDED = re.compile(r"^   \.\. versionadded:: (\d+\.\d+)[ \t]*\n(?=\s*\n(?:\S|\Z)|\Z)", re.M)
_LITERAL = re.compile(r"``([^`]{1,30})``")
_ROLE = re.compile(r":[\w:]+:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")


def load_pages(corpus: str = CORPUS) -> dict[str, str]:
    """page path -> reST text of a fetched corpus (all splits)."""
    from lmlab.rag.documents import read_documents

    return {d.doc_id: d.text for d in read_documents([corpus])}


def _plain(text: str) -> str:
    """reST inline markup to plain text: roles keep their target, emphasis and literals lose their marks."""
    text = _ROLE.sub(r"\1", text)
    return " ".join(text.replace("``", "").replace("**", "").replace("*", "").split())


def _synopsis_questions(path: str, text: str) -> list[dict[str, Any]]:
    out = []
    for m in _MODULE.finditer(text):
        syn = _SYNOPSIS.search(m.group(2))
        if syn:
            what = _plain(syn.group(1)).rstrip(".")
            q = f"Which Python standard library module is documented as follows: {what[0].lower() + what[1:]}?"
            out.append({"question": q, "answers": [m.group(1)], "doc_ids": [path], "type": "template-synopsis"})
    return out


def _versionadded(path: str, text: str) -> list[tuple[str, str]]:
    """(qualified name, version) of top-level functions/classes whose own body says `.. versionadded:: X.Y`."""
    module = m.group(1) if (m := _MODULE.search(text)) else Path(path).name.split(".rst")[0]
    found = []
    directives = list(_DIRECTIVE.finditer(text))
    for i, d in enumerate(directives):
        end = directives[i + 1].start() if i + 1 < len(directives) else len(text)
        body = text[d.end() : end]
        stop = re.search(r"^\S", body, re.M)  # the directive's body ends at the next unindented line
        body = body[: stop.start()] if stop else body
        v = _VERSIONADDED.search(body + "\n")
        if v:
            name = d.group(2)
            found.append((name if name.startswith(module + ".") else f"{module}.{name}", v.group(1)))
    return found


def _cloze_questions(path: str, text: str, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Sentences of prose paragraphs with exactly one ``literal``, blanked."""
    module = _MODULE.search(text)
    name = module.group(1) if module else path
    candidates = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if not lines or any(ln.startswith((" ", "\t", "..", ":", ">>>", "*", "-", "=", "+")) for ln in lines):
            continue
        for sent in re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(ln.strip() for ln in lines)):
            lits = _LITERAL.findall(sent)
            words = sent.split()
            if len(lits) == 1 and 10 <= len(words) <= 35 and sent.endswith(".") and len(_plain(lits[0])) >= 2:
                blanked = sent.replace(f"``{lits[0]}``", "____", 1)
                candidates.append((_plain(blanked), lits[0]))
    rng.shuffle(candidates)
    return [{"question": f"Fill in the blank ({name} documentation): {s}", "answers": [a], "doc_ids": [path],
             "type": "cloze"} for s, a in candidates[:n]]  # fmt: skip


def build_qa(pages: dict[str, str], seed: int = 0, per_page_cloze: int = 2, n_unanswerable: int = 60) -> list[dict]:
    """The QA rows (question, answers, doc_ids, type, split, id), deterministic for the same pages and seed."""
    rng = random.Random(seed)
    kb = sorted(p for p in pages if fnmatch.fnmatchcase(p, KB_PATTERN))
    other = sorted(p for p in pages if p.startswith("library/") and p not in kb)
    if not kb:
        raise LmlabError(f"no page matches {KB_PATTERN}", hint=f"fetch the corpus: lmlab data fetch {CORPUS}")
    rows: list[dict[str, Any]] = []
    for p in kb:
        rows += _synopsis_questions(p, pages[p])
        rows += _cloze_questions(p, pages[p], rng, per_page_cloze)
        added = _versionadded(p, pages[p])
        for name, version in rng.sample(added, min(4, len(added))):
            rows.append({"question": f"In which Python version was {name} added?", "answers": [version],
                         "doc_ids": [p], "type": "template-versionadded"})  # fmt: skip
    for q, answers, docs in PARAPHRASED:
        if not any(a in pages.get(d, "") for a in answers for d in docs):
            raise LmlabError(f"paraphrased question's answer is not on its page: {q!r}")
        rows.append({"question": q, "answers": answers, "doc_ids": docs, "type": "paraphrased"})
    kb_text = "\n".join(pages[p] for p in kb)
    pool = [(name, p) for p in other for name, _ in _versionadded(p, pages[p])]
    pool = [(name, p) for name, p in pool if name.rsplit(".", 1)[-1] not in kb_text]  # not mentioned anywhere in the KB
    for name, _ in rng.sample(pool, min(n_unanswerable, len(pool))):
        rows.append({"question": f"In which Python version was {name} added?", "answers": [], "doc_ids": [],
                     "type": "unanswerable"})  # fmt: skip
    seen, out = set(), []
    for r in rows:
        if r["question"] not in seen:
            seen.add(r["question"])
            r["split"] = "dev" if split_of(r["question"], (0.3, 0.0, 0.7), seed) == "train" else "test"
            r["id"] = f"q{len(out):04d}"
            out.append(r)
    return out


def write_qa(rows: list[dict], out: str | os.PathLike) -> list[Path]:
    """dev.jsonl, test.jsonl and SOURCE.md (provenance, licence, counts) in `out`."""
    import json
    from collections import Counter

    out = Path(out)
    paths = []
    for split in ("dev", "test"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["split"] == split)
        write_text(out / f"python-docs-qa-{split}.jsonl", text)
        paths.append(out / f"python-docs-qa-{split}.jsonl")
    counts = Counter((r["split"], r["type"]) for r in rows)
    types = sorted({t for _, t in counts})
    table = "\n".join(f"| {t} | {counts['dev', t]} | {counts['test', t]} |" for t in types)
    write_text(out / "SOURCE.md", _SOURCE.format(pattern=KB_PATTERN, table=table))
    return paths


_SOURCE = """# Python documentation QA (RAG evaluation set)

- Knowledge base: `lmlab data fetch python-docs` (Debian `python3.11-doc`, PSF-2.0), the pages matching
  `{pattern}` (63 library reference pages). Index it with
  `lmlab rag index python-docs --only '{pattern}' --out kb.sqlite`.
- Questions: built by `lmlab rag make-qa --out data/rag` (lmlab.rag.qa, seed 0), without any larger model:
  templates over reST fields (`:synopsis:`, `.. versionadded::`), cloze sentences (one ``literal`` blanked),
  hand-written paraphrases (lmlab authors; answers checked against the page when built), and unanswerable
  questions (the versionadded template over library pages outside the knowledge base, for names no
  knowledge-base page mentions). Text derived from the Python documentation: PSF-2.0.
- Rows: `question`, `answers` (empty: unanswerable), `doc_ids` (the pages that hold the answer), `type`,
  `split`, `id`. Split by a hash of the question: dev 30%, test 70%.
- `citation-labels.jsonl`: 37 (answer sentence, cited source) pairs from SmolLM2-135M-Instruct's answers in
  `rag eval --model smollm2-135m-instruct --limit 40` (shuffled, seed 0; duplicates skipped), labelled by hand:
  `supported` is true when the source states what the sentence claims (a claim-free lead-in that names the
  right module counts as supported; fragments like "::" or "[1]" do not). `attributed`: lmlab, not the model,
  attached that citation.

| type | dev | test |
|---|---:|---:|
{table}
"""
