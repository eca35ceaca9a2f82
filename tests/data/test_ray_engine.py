"""The Ray engine on a local 2-CPU cluster: the local engine's kept documents, report, errors and token files.

The local engine runs with workers=1 here (no fork pool): forking a process whose Ray client threads are running
is unsafe (gRPC), and its results do not depend on the worker count."""

import gzip
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # a dev dependency: these tests must run, not skip

from lmlab.data import ray_clean
from lmlab.data.clean import clean, load_config
from lmlab.data.ray_clean import clean_ray
from lmlab.data.ray_tokenize import tokenize_ray
from lmlab.data.shards import tokenize_files
from lmlab.errors import LmlabError

SAMPLE = Path(__file__).parents[2] / "data" / "samples" / "sample.jsonl"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_corpus(root: Path, n_docs: int = 700, seed: int = 0, bad: bool = True) -> Path:
    """English + Chinese documents over JSONL (one file large enough to be cut), Parquet (several row groups),
    .jsonl.gz and .txt, with planted exact copies (case and punctuation changed), near copies (a few words edited,
    chains included, across files), PII, documents the filters remove and, optionally, bad lines."""
    rng = random.Random(seed)
    lines = [x for r in map(json.loads, SAMPLE.read_text(encoding="utf-8").splitlines())
             for x in r["text"].split("\n") if len(x) > 20]  # fmt: skip
    docs: list[str] = []
    for _ in range(n_docs):
        roll = rng.random()
        if roll < 0.08 and docs:
            text = rng.choice(docs).upper() + " !!"
        elif roll < 0.2 and docs:
            words = rng.choice(docs).split(" ")
            for _ in range(rng.randint(1, 3)):
                words[rng.randrange(len(words))] = "edited"
            text = " ".join(words)
        elif roll < 0.22:
            text = "too short"
        else:
            text = "\n".join(rng.sample(lines, rng.randint(6, 20)))
            if rng.random() < 0.15:
                text += f"\nmail u{rng.randint(0, 999)}@example.com or call 138{rng.randint(10**7, 10**8 - 1)}"
        docs.append(text)
    root.mkdir(parents=True, exist_ok=True)
    cuts = [0, *(int(n_docs * f) for f in (0.5, 0.7, 0.85, 0.92)), n_docs]
    chunks = [docs[a:b] for a, b in itertools.pairwise(cuts)]
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(chunks[0]):
            if bad and i in (40, 200):
                f.write("{not json\n")
            f.write(json.dumps({"text": t, "n": i}, ensure_ascii=False) + "\n")
    (root / "b").mkdir(exist_ok=True)
    with open(root / "b" / "c.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunks[1])
    pq.write_table(pa.Table.from_pylist([{"text": t, "src": "pq"} for t in chunks[2]]), root / "b" / "d.parquet",
                   row_group_size=20)  # fmt: skip
    with gzip.open(root / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunks[3])
    (root / "f.txt").write_text("\n\n".join(chunks[4]), encoding="utf-8")
    return root


def _ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(folder.glob("part-*.jsonl")) for line in p.open(encoding="utf-8")]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("part-*.jsonl")) for line in p.open(encoding="utf-8")]


def _report(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    for key in ("seconds", "shards", "engine"):
        report.pop(key, None)
    return report


def test_same_documents_and_report_as_local(tmp_path):
    src = make_corpus(tmp_path / "in")
    config = load_config(None, workers=1, block_mb=0.02, txt_unit="paragraph")
    clean([src], tmp_path / "local", config, on_error="skip", progress=False)
    _, engine = clean_ray([src], tmp_path / "ray", config, on_error="skip", progress=False)
    assert engine["blocks"] > 8  # the large JSONL file and the Parquet file were cut
    local = _report(tmp_path / "local")
    assert local["rules"]["exact_dedup"]["docs"] > 20 and local["rules"]["near_dedup"]["docs"] > 20
    assert local["errors_skipped"] == 2 and local["rules"]["pii"]["docs"] > 5
    assert _ids(tmp_path / "ray") == _ids(tmp_path / "local")
    assert _records(tmp_path / "ray") == _records(tmp_path / "local")
    assert _report(tmp_path / "ray") == local  # every count, example and error message
    assert not (tmp_path / "ray" / ray_clean.STAGING).exists()


def test_dedup_only_and_no_dedup_configs(tmp_path):
    src = make_corpus(tmp_path / "in", n_docs=300, seed=3, bad=False)
    for i, overrides in enumerate(
        [{"near_dedup": False}, {"exact_dedup": False}, {"exact_dedup": False, "near_dedup": False}]
    ):
        config = load_config(None, workers=1, block_mb=0.02, **overrides)
        clean([src], tmp_path / f"l{i}", config, progress=False)
        clean_ray([src], tmp_path / f"r{i}", config, progress=False)
        assert _ids(tmp_path / f"r{i}") == _ids(tmp_path / f"l{i}")
        assert _report(tmp_path / f"r{i}") == _report(tmp_path / f"l{i}")


def test_bad_input_same_error_as_local(tmp_path):
    src = make_corpus(tmp_path / "in", n_docs=400)
    config = load_config(None, workers=1, block_mb=0.02)
    with pytest.raises(LmlabError) as local:
        clean([src], tmp_path / "local", config, progress=False)
    with pytest.raises(LmlabError) as distributed:
        clean_ray([src], tmp_path / "ray", config, progress=False)
    assert str(distributed.value) == str(local.value)
    assert ":41: broken JSON line" in str(local.value)  # the first of two (40 records, then it)
    assert not list((tmp_path / "ray").glob("part-*.jsonl"))  # no partial output


def _block_marks(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / ray_clean.STAGING).rglob("block-*.json")}


def test_interrupted_run_resumes_without_redoing_blocks(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "in", n_docs=400, bad=False)
    config = load_config(None, workers=1, block_mb=0.02)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_clean, "connected_components", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clean_ray([src], tmp_path / "ray", config, progress=False)
    marks = _block_marks(tmp_path / "ray")
    assert (
        len(marks) > 8
        and not list((tmp_path / "ray").glob("part-*"))
        and not (tmp_path / "ray" / "report.json").exists()
    )
    with pytest.raises(KeyboardInterrupt):
        clean_ray([src], tmp_path / "ray", config, progress=False)
    assert _block_marks(tmp_path / "ray") == marks  # finished blocks were not redone
    monkeypatch.undo()
    clean_ray([src], tmp_path / "ray", config, progress=False)
    clean([src], tmp_path / "local", config, progress=False)
    assert _ids(tmp_path / "ray") == _ids(tmp_path / "local")


def _kill_first_worker(name: str, killed: list, stop: threading.Event) -> None:
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(f"ray::{name}"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


@pytest.mark.skipif(sys.platform != "linux", reason="finds Ray workers by process title")
def test_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path):
    src = make_corpus(tmp_path / "in", n_docs=1500, seed=5, bad=False)
    config = load_config(None, workers=1, block_mb=0.05)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=("clean_block", killed, stop), daemon=True)
    killer.start()
    try:
        clean_ray([src], tmp_path / "ray", config, progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was running a block to kill"
    clean([src], tmp_path / "local", config, progress=False)
    assert _ids(tmp_path / "ray") == _ids(tmp_path / "local")
    assert _report(tmp_path / "ray") == _report(tmp_path / "local")


def test_tokenize_byte_identical(tmp_path):
    from lmlab.tokenizer.train import train_tokenizer_files

    src = make_corpus(tmp_path / "in", n_docs=300, bad=False)
    tok = tmp_path / "tok"
    train_tokenizer_files([SAMPLE], 500, tok, progress=False)
    local = tokenize_files(tok, [src], tmp_path / "local", val_fraction=0.1, workers=1, progress=False)
    meta = tokenize_ray(tok, [src], tmp_path / "ray", val_fraction=0.1, block_mb=0.02, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    local.pop("seconds"), meta.pop("seconds")
    assert meta == local and meta["splits"]["val"]["docs"] > 10
    assert np.fromfile(tmp_path / "ray" / "train.bin", dtype=meta["dtype"]).size == meta["splits"]["train"]["tokens"]


def test_components_match_scipy():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    from lmlab.data.components import connected_components
    from lmlab.data.ray_shuffle import as_list, partition_of, scatter

    rng = np.random.default_rng(0)
    n, parts = 3000, 3
    a, b = rng.integers(0, n, 2500), rng.integers(0, n, 2500)
    a, b = a[a != b], b[a != b]
    src, dst = np.r_[a, b].astype(np.int64), np.r_[b, a].astype(np.int64)
    edges = [[ray.put(p) for p in as_list(scatter(partition_of(src, parts), parts, src, dst), parts)]]
    refs, stats = connected_components(edges, parts, 2, lambda x: x % 2)
    got = {}
    for row in refs:
        for ref in row:
            node, label = ray.get(ref)
            got.update(zip(node.tolist(), label.tolist()))
    _, comp = scipy_components(coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)), directed=False)
    nodes = np.unique(src)
    smallest = {}
    for v in nodes:  # scipy's component ids -> the smallest node of each
        smallest[comp[v]] = min(smallest.get(comp[v], v), v)
    assert got == {int(v): int(smallest[comp[v]]) for v in nodes}
    assert stats["rounds"] < 30


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path):
    from lmlab.data.ray_shuffle import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LmlabError, match=r"pip install 'lmlab\[ray\]'"):
        import_ray()


def test_staging_is_not_shared_between_fail_and_skip(tmp_path):
    from lmlab.data.blocks import plan_blocks

    src = make_corpus(tmp_path / "in", n_docs=100, bad=False)
    blocks = plan_blocks(sorted(p for p in src.rglob("*") if p.is_file()), 10**6)
    config = load_config(None, workers=1)
    assert ray_clean._fingerprint(blocks, config, "skip") != ray_clean._fingerprint(blocks, config, "fail")
