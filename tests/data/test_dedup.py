"""Exact and near dedup: a lightly edited copy is removed, an unrelated document stays, one kept per cluster."""

from __future__ import annotations

import json
import random

import numpy as np

from lmlab.data.clean import clean, load_config
from lmlab.data.dedup import NearDedup, minhash_signature

SAMPLE = __import__("pathlib").Path(__file__).parents[2] / "data" / "samples" / "sample.jsonl"


def sample_texts(lang: str) -> list[str]:
    return [r["text"] for r in map(json.loads, SAMPLE.read_text(encoding="utf-8").splitlines()) if r["lang"] == lang]


def edit_words(text: str, fraction: float, seed: int = 0) -> str:
    """Replace `fraction` of the words with other words (a realistic light edit)."""
    words = text.split(" ")
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(["river", "stone", "lamp", "garden", "silver", "morning"])
    return " ".join(words)


def run_clean(tmp_path, docs: list[str], **overrides):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "i": i}) + "\n" for i, t in enumerate(docs)), encoding="utf-8")
    config = load_config(None, workers=1, repetition=False, **overrides)
    report = clean([src], tmp_path / "out", config, progress=False)
    kept = [json.loads(line)["i"] for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    return report, kept


def test_near_dup_3_percent_edit_removed_unrelated_kept(tmp_path):
    original, unrelated = sample_texts("en")[:2]
    assert len(original.split()) > 500
    edited = edit_words(original, 0.03)
    assert edited != original
    report, kept = run_clean(tmp_path, [original, unrelated, edited])
    assert kept == [0, 1]
    assert report.rules["near_dedup"].docs == 1 and report.rules["exact_dedup"].docs == 0


def test_near_dup_chinese(tmp_path):
    poems = sample_texts("zh")
    long_zh = "\n".join(poems[:20])  # a long Chinese document
    edited = long_zh.replace("月", "日", 3)
    report, kept = run_clean(tmp_path, [long_zh, "\n".join(poems[20:40]), edited])
    assert kept == [0, 1] and report.rules["near_dedup"].docs == 1


def test_heavier_edit_survives_and_cluster_keeps_first(tmp_path):
    original = sample_texts("en")[0]
    docs = [
        original,
        edit_words(original, 0.4, seed=1),
        edit_words(original, 0.02, seed=2),
        edit_words(original, 0.02, seed=3),
    ]
    _, kept = run_clean(tmp_path, docs)
    assert kept == [0, 1]  # 40% edited is a different document; the 2% copies join the first one's cluster


def test_exact_dedup_ignores_case_and_punctuation(tmp_path):
    a = sample_texts("en")[3]
    b = a.upper().replace(",", "").replace(".", " . ")
    report, kept = run_clean(tmp_path, [a, b], near_dedup=False)
    assert kept == [0] and report.rules["exact_dedup"].docs == 1


def test_near_dedup_threshold_is_respected():
    a = sample_texts("en")[0]
    index = NearDedup(threshold=0.8)
    assert index.check(minhash_signature(a)) is None
    assert index.check(minhash_signature(edit_words(a, 0.03))) == 0
    assert index.check(minhash_signature(sample_texts("en")[1])) is None


def test_signatures_are_deterministic_across_processes():
    import subprocess
    import sys

    code = (
        "from lmlab.data.dedup import minhash_signature; print(minhash_signature('the quick brown fox jumps').tolist())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1 and outs.pop().strip() == str(minhash_signature("the quick brown fox jumps").tolist())


def test_near_dedup_sees_every_kept_document_in_a_band():
    """Two kept documents that collide in a band both stay candidates: a third that duplicates the second is found
    even though the first holds the band key (the Ray engine relies on this being the rule)."""
    from lmlab.data.dedup import NearDedup

    index = NearDedup(0.8, 128, 1)
    rows = index.rows
    a = np.arange(128, dtype=np.uint32)
    b = a + 1000
    b[:rows] = a[:rows]  # same band 0 as a, Jaccard estimate 9/128
    c = b.copy()
    c[rows : rows + 8] += 7  # differs from b in 8 of 128 values (0.94), still band 0 of a and b
    assert index.check(a) is None and index.check(b) is None
    assert index.check(c) == 1
