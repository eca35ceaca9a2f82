"""Data pipeline throughput: clean+dedup MB/s and peak RSS on a generated corpus, tokenize MB/s vs `tokenizers`.

.venv/bin/python benchmarks/data_pipeline.py            # 500 MB input (a few minutes on 2 cores)
.venv/bin/python benchmarks/data_pipeline.py --mb 50    # quicker
.venv/bin/python benchmarks/data_pipeline.py --engine ray --mb 100 [--datatrove-python /work/dtvenv/bin/python]
    # the Ray engine with 1 and 2 workers vs the local engine (and datatrove) on the same input, its kept documents
    # checked against the local engine's; then 4x the input as many small files: dedup memory per task, driver CPU
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


class RayWorkerMemory:
    """Peak resident memory of any one Ray worker process, sampled every 0.2 s while a run lasts."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and proc.info["memory_info"]:
                    self.peak = max(self.peak, proc.info["memory_info"].rss)
            self._stop.wait(0.2)

    def __enter__(self) -> RayWorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(folder.glob("part-*.jsonl")) for line in p.open(encoding="utf-8")]


def _ray_run(inputs: list[Path], out: Path, workers: int) -> tuple[float, dict, float, int]:
    """One Ray run on a fresh local cluster of `workers` CPUs: (seconds, engine stats, driver CPU s, worker peak RSS)."""
    import ray

    from lmlab.data.ray_clean import clean_ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        ray.get([ray.remote(lambda: 0).remote() for _ in range(workers)])  # workers up before the clock starts
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        with RayWorkerMemory() as mem:
            _, engine = clean_ray(inputs, out, load_config(None, workers=workers), progress=False)
        secs = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    finally:
        ray.shutdown()
    return secs, engine, driver_cpu, mem.peak


def ray_main(args: argparse.Namespace) -> None:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "input.jsonl"
        n_bytes = generate(src, args.mb)
        mb = n_bytes / 1e6
        print(f"input: {mb:.0f} MB, one JSONL file (English + Chinese, 5% exact and 5% near copies, PII)")

        t = time.perf_counter()
        clean([src], tmp / "local", load_config(None, workers=args.workers), progress=False)
        local_mbs = mb / (time.perf_counter() - t)
        local_ids = _ids(tmp / "local")
        print(f"local engine, {args.workers} workers: {local_mbs:.2f} MB/s ({local_mbs / args.workers:.2f} per core), "
              f"{len(local_ids):,} documents kept")  # fmt: skip
        rows = []
        for workers in (1, 2):
            secs, engine, driver_cpu, peak = _ray_run([src], tmp / f"ray{workers}", workers)
            same = _ids(tmp / f"ray{workers}") == local_ids
            rows.append((workers, mb / secs, engine, driver_cpu, peak))
            print(f"ray engine, {workers} worker(s): {mb / secs:.2f} MB/s ({mb / secs / workers:.2f} per core), "
                  f"same kept ids as local: {same}; stages {engine['stage_seconds']}; blocks {engine['blocks']}, "
                  f"partitions {engine['partitions']}, largest dedup partition {engine['max_partition_bytes'] / 1e6:.1f} MB, "
                  f"worker peak RSS {peak / 1e6:.0f} MB, driver CPU {driver_cpu:.1f} s of {secs:.0f} s")  # fmt: skip
        ray2 = rows[-1][1]
        print(f"per-core throughput, ray (2 workers) / local (2 workers): {ray2 / local_mbs:.2f}x (goal >= 0.8x)")
        if args.datatrove_python:
            res = subprocess.run(
                [args.datatrove_python, str(Path(__file__).parent / "datatrove_ref.py"), str(src),
                 "--workers", str(args.workers), "--workdir", str(tmp / "dt")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            dt = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"datatrove {dt['datatrove_version']}, {args.workers} workers: {dt['mb_per_s']:.2f} MB/s, "
                  f"{dt['docs_out']:,} kept; ray (2 workers) / datatrove: {ray2 / dt['mb_per_s']:.2f}x (goal >= 3x)")  # fmt: skip
        if args.scale:
            many = tmp / "many"
            many.mkdir()
            total, i = 0, 0
            while total < args.scale * n_bytes:  # the same generator, many small files with other seeds
                total += generate(many / f"part-{i:04d}.jsonl", max(1, args.mb // 25), seed=i + 1)
                i += 1
            secs, engine, driver_cpu, peak = _ray_run([many], tmp / "ray-many", 2)
            print(f"{args.scale}x input ({total / 1e6:.0f} MB in {i} files), ray 2 workers: {total / 1e6 / secs:.2f} MB/s; "
                  f"blocks {engine['blocks']}, partitions {engine['partitions']}, largest dedup partition "
                  f"{engine['max_partition_bytes'] / 1e6:.1f} MB (1x: {rows[-1][2]['max_partition_bytes'] / 1e6:.1f} MB), "
                  f"worker peak RSS {peak / 1e6:.0f} MB (1x: {rows[-1][4] / 1e6:.0f} MB), driver CPU {driver_cpu:.1f} s "
                  f"of {secs:.0f} s; stages {engine['stage_seconds']}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=500, help="size of the generated input")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenize-mb", type=int, default=50, help="how much of the cleaned text to tokenize")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--datatrove-python", default=None, help="--engine ray: a venv's python with datatrove installed")
    p.add_argument("--scale", type=int, default=4, help="--engine ray: then this many times the input (0: skip)")
    args = p.parse_args()
    if args.engine == "ray":
        ray_main(args)
        return
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
