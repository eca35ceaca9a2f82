"""llama.cpp as a test reference: `run_llamacpp(model, requests)` runs run.mjs (node-llama-cpp's prebuilt CPU
build of llama.cpp, pinned in package.json) on one GGUF file. Tests only; lmlab never depends on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SETUP = "run `make setup` (it installs the pinned node-llama-cpp into tests/llamacpp/node_modules)"


def run_llamacpp(model: str | os.PathLike, requests: list[dict[str, Any]], threads: int = 1) -> dict[str, Any]:
    """llama.cpp's answers ({"info": ..., "results": [...]}) to `requests` on one model (see run.mjs).

    One thread by default, as conftest gives torch one per xdist worker under `make test`: ggml's threads spin at
    each barrier, so on a busy 2-core machine two threads waited on each other (48 greedy steps of
    SmolLM2-135M: 37 s with 2 threads, 4 s with 1).
    """
    # CI runs `make setup` first: a missing reference is a broken setup, so fail loudly rather than skip
    if shutil.which("node") is None:
        pytest.fail(f"node is not installed; llama.cpp reference tests need Node.js 20+ and {SETUP}")
    if not (HERE / "node_modules" / "node-llama-cpp").is_dir():
        pytest.fail(f"node-llama-cpp is missing in {HERE}; {SETUP}")
    request = json.dumps({"model": str(model), "threads": threads, "requests": requests})
    proc = subprocess.run(
        ["node", str(HERE / "run.mjs")], input=request, capture_output=True, text=True, cwd=HERE, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"llama.cpp (node run.mjs) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)
