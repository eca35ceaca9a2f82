"""Data pipeline throughput: clean+dedup MB/s and peak RSS on a generated corpus, tokenize MB/s vs `tokenizers`.

.venv/bin/python benchmarks/data_pipeline.py            # 500 MB input (a few minutes on 2 cores)
.venv/bin/python benchmarks/data_pipeline.py --mb 50    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from lmlab.data.clean import clean, load_config
from lmlab.data.shards import tokenize_files
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.train import train_tokenizer_files

SAMPLE = Path(__file__).parents[1] / "data" / "samples" / "sample.jsonl"


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    """English + Chinese documents made of shuffled sample lines; 5% exact and 5% near duplicates, some PII."""
    rng = random.Random(seed)
    lines = [
        x for r in map(json.loads, SAMPLE.read_text(encoding="utf-8").splitlines()) for x in r["text"].split("\n") if x
    ]
    target, written, recent = megabytes * 1_000_000, 0, []
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            roll = rng.random()
            if roll < 0.05 and recent:
                text = rng.choice(recent)  # exact copy
            elif roll < 0.10 and recent:
                words = rng.choice(recent).split(" ")
                words[rng.randrange(len(words))] = "edited"  # near copy
                text = " ".join(words)
            else:
                text = "\n".join(rng.sample(lines, rng.randint(20, 60)))
                if rng.random() < 0.1:
                    text += f"\nContact: user{rng.randint(0, 10**6)}@example.com, 138{rng.randint(10**7, 10**8 - 1)}"
            recent = ([*recent, text])[-100:]
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of the largest finished child process."""
    kb = 1024 if os.uname().sysname == "Darwin" else 1  # macOS reports bytes, Linux kilobytes
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb
    return self_kb / 1024, child_kb / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=500, help="size of the generated input")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenize-mb", type=int, default=50, help="how much of the cleaned text to tokenize")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "input.jsonl"
        t = time.perf_counter()
        n_bytes = generate(src, args.mb)
        print(f"generated {n_bytes / 1e6:.0f} MB in {time.perf_counter() - t:.0f}s")
        rss_before = peak_rss_mb()[0]

        t = time.perf_counter()
        report = clean([src], tmp / "clean", load_config(None, workers=args.workers), progress=False)
        secs = time.perf_counter() - t
        rss_main, rss_child = peak_rss_mb()
        print(report.table())
        print(
            f"clean+dedup: {n_bytes / 1e6 / secs:.2f} MB/s ({args.workers} workers, {secs:.0f}s for {n_bytes / 1e6:.0f} MB)"
        )
        print(
            f"peak RSS: main process {rss_main:.0f} MB (was {rss_before:.0f} MB before cleaning), largest worker {rss_child:.0f} MB"
        )

        tok_dir = tmp / "tok"
        train_tokenizer_files([SAMPLE], 4000, tok_dir, progress=False)
        part = tmp / "tok_input.jsonl"
        with open(tmp / "clean" / "part-00000.jsonl", encoding="utf-8") as f, open(part, "w", encoding="utf-8") as g:
            size = 0
            for line in f:
                g.write(line)
                size += len(line.encode("utf-8"))
                if size > args.tokenize_mb * 1_000_000:
                    break
        texts = [json.loads(line)["text"] for line in part.open(encoding="utf-8")]
        text_mb = sum(len(x.encode("utf-8")) for x in texts) / 1e6

        backend = load_tokenizer(tok_dir).backend  # reference: the Rust library's own batch encoding, in memory
        t = time.perf_counter()
        for i in range(0, len(texts), 1024):
            backend.encode_batch(texts[i : i + 1024], add_special_tokens=False)
        ref = text_mb / (time.perf_counter() - t)

        t = time.perf_counter()
        tokenize_files(tok_dir, [part], tmp / "shards", workers=args.workers, progress=False)
        ours = text_mb / (time.perf_counter() - t)
        print(f"tokenize: {ours:.2f} MB/s (files -> .bin, {args.workers} workers); tokenizers encode_batch in memory: "
              f"{ref:.2f} MB/s; ratio {ours / ref:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
