"""`lmlab data clean --engine ray`: the cleaning pipeline on a Ray cluster, with the local engine's rules, order,
kept documents and report.

    blocks ──clean_block──▶ staged survivors (text + exact key + MinHash signature per document)   [cached: resume]
          ──exact: shuffle by key──▶ first occurrence kept
          ──bands: shuffle by (band, key)──▶ collision edges ──connected components──▶ component labels
          ──signatures: shuffle by label──▶ NearDedup (the local engine's class) run on each component
          ──write_block──▶ part-BLOCK.jsonl, moved into place with report.json when every block is written

Why components reproduce the local engine exactly: NearDedup drops a document only for a kept document it shares a
band with, so a document's fate depends only on its component of band collisions; running the same class over each
component in input order makes the same decisions. Every stage is a set of tasks over partitions: no process holds
more than its share (the driver holds object references and per-block summaries).

Order: a document's id inside the pipeline is (block << 32) | row, rows counted over a block's survivors of the
per-document rules; sorting by it is input order.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.blocks import Block, count_lines, default_block_bytes, number_blocks, plan_blocks, read_block
from lmlab.data.clean import (
    clean_text,
    load_config,
    near_reason,
    output_record,
    record_events,
    start_report,
)
from lmlab.data.components import connected_components
from lmlab.data.dedup import NearDedup, band_keys, band_multipliers, exact_key, lsh_params, minhash_signature
from lmlab.data.ray_shuffle import as_list, connect, error_dict, gather, held_bytes, partition_of, remote, scatter
from lmlab.data.readers import list_files
from lmlab.data.report import Report
from lmlab.errors import LmlabError
from lmlab.utils.atomic import plain_mode, write_json
from lmlab.utils.progress import progress_bar

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
PARTITION_BYTES = 64e6  # input bytes per shuffle partition: partitions grow with the corpus, their memory does not
STAGING = ".ray-staging"


def _staged(stage: Path, block: int, suffix: str) -> Path:
    return stage / f"block-{block:06d}.{suffix}"


def block_group(groups: int, orders: np.ndarray) -> np.ndarray:
    """Which block group (the partition results are sent back by) each document order belongs to."""
    return (orders >> ROW_BITS) % groups


# --- stage 1: the per-document rules, on one block (cached on disk: a resumed run skips finished blocks) ---


def clean_block(block: Block, config: dict[str, Any], on_error: str, stage: Path) -> dict[str, Any]:
    """Clean one block; stage its survivors (JSONL records, and exact keys / signatures / lines / lengths in .npz);
    return its report (to_dict) and survivor count, or {"error": ...} on bad input with on_error='fail'."""
    done = _staged(stage, block.index, "json")
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    report = Report()
    near = config.get("near_dedup")
    lines, chars, keys, sigs = [], [], [], []
    tmp = _staged(stage, block.index, f"jsonl.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in read_block(block, config["text_field"], config["txt_unit"], on_error):
                if isinstance(doc, LmlabError):
                    report.add_error(str(doc))
                    continue
                report.docs_in += 1
                report.chars_in += len(doc.text)
                where = f"{doc.file}:{doc.line}"
                text, events = clean_text(doc.text, config)
                record_events(report, events, where, doc.text)
                if text is None:
                    continue
                f.write(json.dumps(output_record(text, where, doc.fields), ensure_ascii=False) + "\n")
                lines.append(doc.line)
                chars.append(len(text))
                if config.get("exact_dedup"):
                    keys.append(exact_key(text))
                if near:
                    sigs.append(minhash_signature(text, near["num_perm"], near["ngram"], near["seed"]))
    except LmlabError as e:
        tmp.unlink(missing_ok=True)
        return {"error": error_dict(e)}
    num_perm = near["num_perm"] if near else 0
    arrays = {
        "lines": np.array(lines, dtype=np.int64),
        "chars": np.array(chars, dtype=np.int64),
        "keys": np.frombuffer(b"".join(keys), dtype=np.uint64).reshape(-1, 2) if keys else np.zeros((0, 2), np.uint64),
        "sigs": np.stack(sigs) if sigs else np.zeros((0, num_perm), np.uint32),
    }
    npz_tmp = _staged(stage, block.index, f"npz.{os.getpid()}.tmp.npz")
    np.savez(npz_tmp, **arrays)
    os.replace(npz_tmp, _staged(stage, block.index, "npz"))
    os.replace(tmp, _staged(stage, block.index, "jsonl"))
    result = {"report": report.to_dict(), "survivors": len(lines)}
    write_json(done, result)  # last: its presence marks the block finished
    return result


def _load(stage: Path, block: int, name: str) -> np.ndarray:
    with np.load(_staged(stage, block, "npz")) as z:
        return z[name]


def _rows_of(block: int, pieces: tuple) -> np.ndarray:
    """Rows of this block among the orders in a group's pieces."""
    (orders,) = gather(pieces, 1)
    return orders[(orders >> ROW_BITS) == block] & ROW_MASK


# --- stage 2: exact dedup, a shuffle by key ---


def exact_map(stage: Path, block: int, parts: int) -> Any:
    keys = _load(stage, block, "keys")
    orders = (block << ROW_BITS) | np.arange(len(keys), dtype=np.int64)
    return scatter(partition_of(keys[:, 0], parts), parts, keys[:, 0], keys[:, 1], orders)


def exact_reduce(groups: int, *pieces: tuple) -> Any:
    """Drop all but the first (in input order) document of each key; the drops go back by block group."""
    hi, lo, orders = gather(pieces, 3, (np.uint64, np.uint64, np.int64))
    idx = np.lexsort((orders, lo, hi))
    hi, lo, orders = hi[idx], lo[idx], orders[idx]
    first = np.r_[True, (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])] if len(hi) else np.zeros(0, bool)
    dropped = np.sort(orders[~first])
    return [*as_list(scatter(block_group(groups, dropped), groups, dropped), groups), held_bytes(hi, lo, orders)]


# --- stage 3: band keys, a shuffle by (band, key) into collision edges ---


def band_map(stage: Path, block: int, near: dict[str, Any], parts: int, *exact_pieces: tuple) -> Any:
    sigs = _load(stage, block, "sigs")
    keep = np.ones(len(sigs), dtype=bool)
    keep[_rows_of(block, exact_pieces)] = False
    rows = np.flatnonzero(keep)
    bands, r = lsh_params(near["threshold"], near["num_perm"])
    keys = band_keys(sigs[rows], bands, band_multipliers(r, near["seed"]))  # (m, bands)
    band = np.broadcast_to(np.arange(bands, dtype=np.uint64), keys.shape).ravel()
    key = keys.ravel()
    orders = np.repeat((block << ROW_BITS) | rows.astype(np.int64), bands)
    with np.errstate(over="ignore"):
        mixed = key ^ (band * np.uint64(0xD6E8FEB86659FD93))
    return scatter(partition_of(mixed, parts), parts, band, key, orders)


def band_reduce(parts: int, *pieces: tuple) -> Any:
    """Documents sharing a band key: an edge from each to the first of them (both directions, by source node)."""
    band, key, orders = gather(pieces, 3, (np.uint64, np.uint64, np.int64))
    idx = np.lexsort((orders, key, band))
    band, key, orders = band[idx], key[idx], orders[idx]
    start = np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])] if len(band) else np.zeros(0, bool)
    first = orders[start][np.cumsum(start) - 1]
    a, b = first[~start], orders[~start]
    src, dst = np.r_[a, b], np.r_[b, a]
    return [*as_list(scatter(partition_of(src, parts), parts, src, dst), parts), held_bytes(band, key, orders)]


# --- stage 4 is components.connected_components; stage 5: signatures to their component's partition ---


def signature_map(stage: Path, block: int, parts: int, *label_pieces: tuple) -> Any:
    nodes, labels = gather(label_pieces, 2)
    mine = (nodes >> ROW_BITS) == block
    nodes, labels = nodes[mine], labels[mine]
    sigs = _load(stage, block, "sigs")[nodes & ROW_MASK]
    return scatter(partition_of(labels, parts), parts, labels, nodes, sigs)


def near_reduce(groups: int, near: dict[str, Any], *pieces: tuple) -> Any:
    """Run NearDedup over each component in input order; the drops (and the kept document each duplicates) go back
    by block group."""
    num_perm = near["num_perm"]
    labels = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
    orders = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
    sigs = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros((0, num_perm), np.uint32)
    idx = np.lexsort((orders, labels))
    labels, orders, sigs = labels[idx], orders[idx], sigs[idx]
    bounds = np.r_[np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]), len(labels)] if len(labels) else [0]
    dropped, witness = [], []
    for a, b in itertools.pairwise(bounds):
        index = NearDedup(near["threshold"], num_perm, near["seed"], capacity=b - a)
        kept: list[int] = []
        for j in range(a, b):
            k = index.check(sigs[j])
            if k is None:
                kept.append(int(orders[j]))
            else:
                dropped.append(int(orders[j]))
                witness.append(kept[k])
    d, w = np.array(dropped, dtype=np.int64), np.array(witness, dtype=np.int64)
    return [*as_list(scatter(block_group(groups, d), groups, d, w), groups), held_bytes(orders, sigs)]


# --- stage 6: write each block's kept documents ---


def write_block(
    stage: Path, block: int, files: list[str], config: dict[str, Any], n_exact: int, *pieces: tuple
) -> dict[str, Any]:
    """part-BLOCK.jsonl (in the staging folder) with the documents neither dedup dropped, and the dedup part of the
    report for this block."""
    exact_rows = set(_rows_of(block, pieces[:n_exact]).tolist())
    dropped, witness = gather(pieces[n_exact:], 2)
    mine = (dropped >> ROW_BITS) == block
    near = dict(zip((dropped[mine] & ROW_MASK).tolist(), witness[mine].tolist()))
    with np.load(_staged(stage, block, "npz")) as z:
        lines, chars = z["lines"], z["chars"]
    report = start_report({"exact_dedup": config.get("exact_dedup"), "near_dedup": config.get("near_dedup")})
    name = f"part-{block:05d}.jsonl"
    out = stage / "final" / name
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    kept = 0
    with open(_staged(stage, block, "jsonl"), encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as g:
        for row, line in enumerate(f):
            rule = "exact_dedup" if row in exact_rows else "near_dedup" if row in near else None
            if rule is None:
                g.write(line)
                kept += 1
                report.chars_out += int(chars[row])
                continue
            stats = report.rule(rule)
            where = f"{files[block]}:{lines[row]}"
            if len(stats.examples) < 3:  # the text and the duplicate's location only for the report's examples
                text = json.loads(line)["text"]
                if rule == "exact_dedup":
                    reason = "same normalized text as an earlier document"
                else:
                    wb, wr = near[row] >> ROW_BITS, near[row] & ROW_MASK
                    reason = near_reason(f"{files[wb]}:{_load(stage, wb, 'lines')[wr]}")
                stats.add(int(chars[row]), where, reason, text)
            else:
                stats.docs += 1
                stats.chars += int(chars[row])
    report.docs_out = kept
    if kept:
        plain_mode(tmp)
        os.replace(tmp, out)
    else:
        tmp.unlink()
    return {"report": report.to_dict(), "shard": name if kept else None}


# --- the driver ---


def _fingerprint(blocks: list[Block], config: dict[str, Any], on_error: str) -> str:
    """Names the staging folder: a resumed run reuses finished blocks only for the same input, blocks and rules."""
    h = hashlib.sha256()
    for path in dict.fromkeys(b.file for b in blocks):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([(b.file, b.start, b.end, b.row_groups) for b in blocks]).encode())
    h.update(json.dumps({k: v for k, v in config.items() if k != "workers"}, sort_keys=True, default=str).encode())
    h.update(on_error.encode())  # a block cleaned with skipped errors must not serve a run that should fail
    return h.hexdigest()[:16]


def _wait_in_order(ray: Any, refs: list, sizes: list[int], desc: str, progress: bool) -> list[Any]:
    """Results of stage-1 tasks as they finish (progress by input bytes); on the first bad-input error, later
    blocks are cancelled and the error of the earliest failing block (the one the local engine would hit) raised."""
    results: list[Any] = [None] * len(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending, first_error = list(refs), len(refs)
    bar = progress_bar(total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=not progress)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            results[i] = ray.get(done[0])
            bar.update(sizes[i])
            if "error" in results[i] and i < first_error:
                first_error = i
                for ref in pending:
                    if index[ref] > i:
                        ray.cancel(ref)
                pending = [r for r in pending if index[r] < i]
    finally:
        bar.close()
    if first_error < len(refs):
        raise LmlabError(**results[first_error]["error"])
    return results


def clean_ray(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    config: dict[str, Any] | str | os.PathLike | None = None,
    on_error: str = "fail",
    progress: bool = True,
    address: str | None = None,
) -> tuple[Report, dict[str, Any]]:
    """`clean` on Ray: same kept documents (same ids, in input order) and the same report counts; returns the report
    and the engine's stats (blocks, partitions, stage seconds, the largest shuffle partition)."""
    if on_error not in ("fail", "skip"):
        raise LmlabError(f"on_error must be 'fail' or 'skip', not {on_error!r}", field="on_error")
    if not isinstance(config, dict):
        config = load_config(config)
    start = time.perf_counter()
    out = Path(out)
    files = list_files(inputs)
    total = sum(f.stat().st_size for f in files)
    ray = connect(address, int(config["workers"]))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = plan_blocks(files, default_block_bytes(total, cpus, float(config["block_mb"])))
    timings: dict[str, float] = {}

    clock = [start]  # when the previous stage ended

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - clock[0], 3)
        clock[0] = time.perf_counter()

    if any(b.end is not None for b in blocks):  # line numbers of JSONL pieces: newline counts, in parallel
        counts = ray.get([remote(count_lines).remote(b) for b in blocks])
        blocks = number_blocks(blocks, counts)
    stage = out / STAGING / _fingerprint(blocks, config, on_error)
    (stage / "final").mkdir(parents=True, exist_ok=True)
    n = len(blocks)
    lap("plan")

    cleaned = _wait_in_order(
        ray, [remote(clean_block).remote(b, config, on_error, stage) for b in blocks], [b.bytes for b in blocks],
        "clean", progress,
    )  # fmt: skip
    lap("clean")
    parts = max(2, cpus, math.ceil(total / PARTITION_BYTES))
    groups = parts
    engine: dict[str, Any] = {"name": "ray", "blocks": n, "partitions": parts, "cpus": cpus}
    peak = [0]
    live = [b for b in range(n) if cleaned[b]["survivors"]]  # blocks with documents left to deduplicate

    def reduce_all(fn: Any, width: int, *args: Any, inputs: list[list]) -> list[list]:
        """Start fn over every partition; returns refs[partition][group], recording the bytes each one held."""
        outs, held = [], []
        for p in range(parts):
            *refs, stat = fn.options(num_returns=width + 1).remote(*args, *[r[p] for r in inputs])
            outs.append(refs)
            held.append(stat)
        peak[0] = max(peak[0], *ray.get(held))
        return outs

    exact_refs: list[list] = []
    if config.get("exact_dedup") and live:
        maps = [as_list(remote(exact_map).options(num_returns=parts).remote(stage, b, parts), parts) for b in live]
        exact_refs = reduce_all(remote(exact_reduce), groups, groups, inputs=maps)
        lap("exact_dedup")
    near_refs: list[list] = []
    near = config.get("near_dedup")
    if near and live:
        band_fn = remote(band_map).options(num_returns=parts)
        maps = [as_list(band_fn.remote(stage, b, near, parts, *[r[b % groups] for r in exact_refs]), parts)
                for b in live]  # fmt: skip
        edges = reduce_all(remote(band_reduce), parts, parts, inputs=maps)
        label_refs, cc = connected_components(edges, parts, groups, functools.partial(block_group, groups))
        engine["component_rounds"] = cc["rounds"]
        peak[0] = max(peak[0], cc["max_partition_bytes"])
        sig_fn = remote(signature_map).options(num_returns=parts)
        maps = [as_list(sig_fn.remote(stage, b, parts, *[r[b % groups] for r in label_refs]), parts) for b in live]
        near_refs = reduce_all(remote(near_reduce), groups, groups, near, inputs=maps)
        lap("near_dedup")

    files_ref = ray.put([b.file for b in blocks])
    writes = [
        remote(write_block).remote(
            stage, b, files_ref, config, len(exact_refs), *[r[b % groups] for r in exact_refs],
            *[r[b % groups] for r in near_refs],
        )
        for b in live
    ]  # fmt: skip
    written = dict(zip(live, ray.get(writes)))
    lap("write")

    report = start_report(config)
    for b in range(n):
        report.merge(cleaned[b]["report"])
    for b in live:
        report.merge(written[b]["report"])
    shards = []
    for b in live:  # every block is written: move the shards into place (each rename atomic), then the report
        name = written[b]["shard"]
        if name:
            os.replace(stage / "final" / name, out / name)
            shards.append(name)
    engine["max_partition_bytes"] = peak[0]
    engine["stage_seconds"] = timings
    result = report.to_dict()
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["shards"] = shards
    result["inputs"] = [str(f) for f in files]
    result["config"] = {k: v for k, v in config.items() if not k.startswith("_")}
    result["engine"] = engine
    write_json(out / "report.json", result)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return report, engine
