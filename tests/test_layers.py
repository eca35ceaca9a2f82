"""The house plan's layers (ARCHITECTURE.md): a package imports only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"
# lower number = lower layer; the packages checked here are the foundations everything else stands on
RANK = {
    "errors": 0,
    "utils": 0,
    "kernels": 0,
    "data": 1,
    "tokenizer": 1,
    "model": 2,
    "generate": 3,
    "train": 4,
    "compress": 5,
}
ALLOWED_ANYWHERE = {"viz"}  # plots are called by the layer that has the data


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lmlab.")}
    return names


@pytest.mark.parametrize("package", [p for p in RANK if (SRC / p).is_dir()])
def test_imports_point_down(package):
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path) - ALLOWED_ANYWHERE:
            if RANK.get(name, 99) > RANK[package]:
                bad.append(f"{path.relative_to(SRC)} imports lmlab.{name}")
    assert not bad, "\n".join(bad)
