"""The cleaning pipeline: read -> normalize -> filter -> mask PII -> dedup -> JSONL shards + report.json, streaming."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmlab.data import filters, normalize
from lmlab.data.dedup import ExactDedup, NearDedup, exact_key, minhash_signature
from lmlab.data.parallel import parallel_map
from lmlab.data.pii import mask_pii
from lmlab.data.readers import Doc, list_files, read_documents
from lmlab.data.report import Report
from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_json
from lmlab.utils.progress import progress_bar

# every rule and its settings; recipes/data/default.yaml spells out the same values. `false` turns a rule off.
DEFAULT_CONFIG: dict[str, Any] = {
    "text_field": "text",
    "txt_unit": "file",  # a .txt file is one document (or: paragraph, line)
    "workers": 2,
    "batch_docs": 64,  # documents per task sent to a worker
    "shard_docs": 50_000,  # documents per output shard
    "block_mb": 64,  # --engine ray: input split into blocks of this size (smaller when the input is small)
    "nfkc": True,
    "control_chars": True,
    "html": True,
    "whitespace": True,
    "length": {"min_chars": 20, "max_chars": 2_000_000},
    "language": {"keep": ["en", "zh"], "min_fraction": 0.5},
    "repetition": {
        "max_dup_line_fraction": 0.3,
        "max_dup_line_char_fraction": 0.2,
        "max_dup_para_fraction": 0.3,
        "max_dup_para_char_fraction": 0.2,
        "max_top_ngram_fraction": {2: 0.2, 3: 0.18, 4: 0.16},
    },
    "symbols": {"max_symbol_word_ratio": 0.1},
    "bad_words": {
        "words": ["viagra", "casino", "porn", "xxx", "赌博", "博彩", "色情", "代开发票", "六合彩"],
        "max_fraction": 0.005,
    },
    "pii": {"kinds": ["email", "cn_id", "card", "ipv4", "phone"]},
    "exact_dedup": True,
    "near_dedup": {"threshold": 0.8, "num_perm": 128, "ngram": 3, "seed": 1},
}
NORMALIZERS = {
    "nfkc": normalize.nfkc,
    "control_chars": normalize.strip_control,
    "html": normalize.strip_html,
    "whitespace": normalize.normalize_whitespace,
}


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """The default config, updated by a YAML recipe and then by keyword overrides; unknown keys are errors."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    updates: dict[str, Any] = {}
    if path is not None:
        try:
            updates = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise LmlabError("no such config file", file=str(path)) from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise LmlabError(f"invalid YAML: {e}", file=str(path), line=None if line is None else line + 1) from None
        if not isinstance(updates, dict):
            raise LmlabError("expected a mapping of rule names to settings", file=str(path))
    updates.update(overrides)
    for key, value in updates.items():
        if key not in config:
            raise LmlabError(
                f"unknown setting; known: {', '.join(config)}", file=str(path) if path else None, field=key
            )
        if isinstance(config[key], dict) and isinstance(value, dict):
            unknown = set(value) - set(config[key])
            if unknown:
                raise LmlabError(f"unknown setting {sorted(unknown)[0]!r}", file=str(path) if path else None, field=key)
            config[key].update(value)
        else:
            config[key] = value
    return config


# --- worker side: every rule but dedup, on one batch of texts ---

_CFG: dict[str, Any] = {}


def _init_worker(config: dict[str, Any]) -> None:
    _CFG.clear()
    _CFG.update(config)


def clean_text(text: str, config: dict[str, Any]) -> tuple[str | None, list[tuple[str, str, int, str, dict | None]]]:
    """Apply every per-document rule; returns the text (None if dropped) and events (rule, action, chars, reason, counts)."""
    events: list[tuple[str, str, int, str, dict | None]] = []
    for name, fn in NORMALIZERS.items():
        if config.get(name):
            new = fn(text)
            if new != text:
                events.append((name, "changed", max(0, len(text) - len(new)), "", None))
                text = new
    checks = [
        ("length", lambda t, c: filters.length_filter(t, **c)),
        ("language", lambda t, c: filters.language_filter(t, **c)),
        ("repetition", lambda t, c: filters.repetition_filter(t, **c)),
        ("symbols", lambda t, c: filters.symbol_filter(t, **c)),
        (
            "bad_words",
            lambda t, c: filters.bad_words_filter(
                t, filters.compile_bad_words(c.get("words", [])), c.get("max_fraction", 0.005)
            ),
        ),
    ]
    for name, check in checks:
        settings = config.get(name)
        if settings:
            reason = check(text, settings if isinstance(settings, dict) else {})
            if reason:
                events.append((name, "removed", len(text), reason, None))
                return None, events
    if config.get("pii"):
        new, counts = mask_pii(text, config["pii"].get("kinds"))
        if counts:
            events.append(("pii", "masked", max(0, len(text) - len(new)), ", ".join(counts), dict(counts)))
            text = new
    return text, events


def record_events(report: Report, events: list, where: str, text: str) -> None:
    """Count what clean_text did to one document (both engines)."""
    for rule, action, chars, reason, counts in events:
        stats = report.rule(rule, action)
        stats.add(chars, where, reason, text)
        for kind, n in (counts or {}).items():
            stats.counts[kind] = stats.counts.get(kind, 0) + n


def near_reason(kept_where: str) -> str:
    return f"near-duplicate of {kept_where}"


def output_record(text: str, where: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A kept document as written: its cleaned text, a stable id (FILE:LINE of its source, unless the record has its
    own `id`), and the record's other fields."""
    return {"text": text, "id": where, **{k: v for k, v in fields.items() if k != "text"}}


def start_report(config: dict[str, Any]) -> Report:
    """An empty report with every enabled rule in pipeline order, so rules that removed nothing still appear."""
    report = Report()
    for name in NORMALIZERS:
        if config.get(name):
            report.rule(name, "changed")
    for name in ("length", "language", "repetition", "symbols", "bad_words"):
        if config.get(name):
            report.rule(name)
    if config.get("pii"):
        report.rule("pii", "masked").counts = {}
    if config.get("exact_dedup"):
        report.rule("exact_dedup")
    if config.get("near_dedup"):
        report.rule("near_dedup")
    return report


def _process_batch(texts: list[str]) -> list[tuple[str | None, list, bytes | None, np.ndarray | None]]:
    out = []
    near = _CFG.get("near_dedup")
    for text in texts:
        new, events = clean_text(text, _CFG)
        key = sig = None
        if new is not None:
            key = exact_key(new) if _CFG.get("exact_dedup") else None
            if near:
                sig = minhash_signature(new, near["num_perm"], near["ngram"], near["seed"])
        out.append((new, events, key, sig))
    return out


# --- main side: reading, dedup, writing ---


class ShardWriter:
    """JSONL shards written into a hidden staging folder and moved into place only when the whole run succeeds."""

    def __init__(self, out: Path, docs_per_shard: int, prefix: str = "part") -> None:
        self.out, self.docs_per_shard, self.prefix = out, docs_per_shard, prefix
        self.staging = out / f".staging-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.index, self.count, self.file = 0, 0, None
        self.names: list[str] = []

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            name = f"{self.prefix}-{self.index:05d}.jsonl"
            self.names.append(name)
            self.file = open(self.staging / name, "w", encoding="utf-8")  # noqa: SIM115 (closed in _close)
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1
        if self.count == self.docs_per_shard:
            self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file, self.count, self.index = None, 0, self.index + 1

    def commit(self) -> list[Path]:
        """Move every finished shard into the output folder (each rename is atomic)."""
        self._close()
        paths = []
        for name in self.names:
            os.replace(self.staging / name, self.out / name)
            paths.append(self.out / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        return paths

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _batches(docs: Iterator[Doc | LmlabError], report: Report, size: int, meta: deque) -> Iterator[list[str]]:
    """Group documents into batches of texts; bad input is counted (skip mode) and never reaches a worker."""
    batch: list[str] = []
    for doc in docs:
        if isinstance(doc, LmlabError):
            report.add_error(str(doc))
            continue
        report.docs_in += 1
        report.chars_in += len(doc.text)
        batch.append(doc.text)
        meta.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def clean(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    config: dict[str, Any] | str | os.PathLike | None = None,
    on_error: str = "fail",
    progress: bool = True,
) -> Report:
    """Clean files/folders into JSONL shards plus report.json in `out`; returns the report.

    Streaming: documents flow through a bounded pool of workers (all per-document rules and the MinHash signature),
    while this process keeps only the dedup index (16 bytes per document, a MinHash signature per kept document).
    """
    if not isinstance(config, dict):
        config = load_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_files(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    report = start_report(config)
    exact = ExactDedup() if config.get("exact_dedup") else None
    near_cfg = config.get("near_dedup")
    near = NearDedup(near_cfg["threshold"], near_cfg["num_perm"], near_cfg["seed"]) if near_cfg else None
    kept_where: list[str] = []  # file:line of each document NearDedup kept, to name it in the report
    writer = ShardWriter(out, int(config["shard_docs"]))
    pending: deque[Doc] = deque()  # documents read but not yet written, in order (at most a few batches)
    start = time.perf_counter()
    bar = progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="clean", disable=not progress)
    try:
        docs = read_documents(files, config["text_field"], config["txt_unit"], on_error)
        batches = _batches(docs, report, int(config["batch_docs"]), pending)
        results = parallel_map(_process_batch, batches, int(config["workers"]), _init_worker, (config,))
        for batch_results in results:
            for text, events, key, sig in batch_results:
                doc = pending.popleft()
                bar.update(len(doc.text.encode("utf-8")) if progress else 0)
                where = f"{doc.file}:{doc.line}"
                record_events(report, events, where, doc.text)
                if text is None:
                    continue
                if exact is not None and exact.is_duplicate(key):
                    report.rule("exact_dedup").add(
                        len(text), where, "same normalized text as an earlier document", text
                    )
                    continue
                if near is not None:
                    kept = near.check(sig)
                    if kept is not None:
                        report.rule("near_dedup").add(len(text), where, near_reason(kept_where[kept]), text)
                        continue
                    kept_where.append(where)
                writer.write(output_record(text, where, doc.fields))
                report.docs_out += 1
                report.chars_out += len(text)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shards = writer.commit()
    result = report.to_dict()
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["shards"] = [p.name for p in shards]
    result["inputs"] = [str(f) for f in files]
    result["config"] = {k: v for k, v in config.items() if not k.startswith("_")}
    write_json(out / "report.json", result)  # JSON only: a .txt here would be read back as data by the next step
    return report
