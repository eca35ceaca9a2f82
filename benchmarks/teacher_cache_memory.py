"""Peak memory of reusing a distillation cache (`compress.distill.teacher_pass`): a synthetic float16
feature file (3,000 windows x 128 x 576, 423 MB, the shape of SmolLM2's EAGLE cache) reused by its
reversed corpus plus 16 new windows. Prints the peak RSS growth as a multiple of the file's size.

    PYTHONPATH=src python benchmarks/teacher_cache_memory.py

Each measurement runs in a fresh process (ru_maxrss only grows). One-off on 2026-12-05: +880 MB
(2.1x the file); the code before this change took +1,274 MB (3.0x) for the same bytes written.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

N, T, D = 3000, 128, 576


def run(path: Path, step: str) -> None:
    from lmlab.compress.distill import teacher_pass

    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 49152, (N, T), generator=g)

    def fn(_, rows: torch.Tensor) -> dict[str, torch.Tensor]:  # stands in for the teacher's hidden states
        return {"features": (rows[..., None].float() / 49152).expand(-1, -1, D).half().clone()}

    teacher = torch.nn.Linear(1, 1)
    if step == "make":
        teacher_pass(teacher, windows, path, fn, "make", batch=16, progress=False)
        return
    grown = torch.cat([windows.flip(0), torch.randint(0, 49152, (16, T), generator=g)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    teacher_pass(teacher, grown, path, fn, "reuse", batch=16, progress=False)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MB
    size = path.stat().st_size / 2**20
    print(f"teacher_pass reusing a {size:.0f} MB file: peak RSS +{grew:.0f} MB ({grew / size:.1f}x the file)")


def main() -> None:
    if len(sys.argv) == 3:
        run(Path(sys.argv[1]), sys.argv[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.safetensors"
        for step in ("make", "reuse"):
            subprocess.run([sys.executable, __file__, str(path), step], check=True)


if __name__ == "__main__":
    main()
