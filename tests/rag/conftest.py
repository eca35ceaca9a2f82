"""A small corpus of Markdown notes, the MiniLM encoder and indexes built from them, shared by the RAG tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DOCS = {
    "tea.md": "# Tea\n\nGreen tea is brewed at 80 degrees Celsius for two minutes. Black tea needs boiling water "
    "and four minutes.\n\n## Storage\n\nKeep tea leaves in an airtight tin, away from light and strong smells.\n",
    "bikes.md": "# Bicycles\n\nA road bike tyre is inflated to about 6 bar. Mountain bike tyres run at lower "
    "pressure for grip.\n\n## Chains\n\nClean and oil the chain every 300 kilometres to stop rust and wear.\n",
    "bees.md": "# Honey bees\n\nA worker bee lives about six weeks in summer. The queen lays up to 2000 eggs a "
    "day.\n\n## Waggle dance\n\nForagers dance to tell the hive the direction and distance of flowers.\n",
    "volcano.md": "# Volcanoes\n\nMagma that reaches the surface is called lava. Basalt lava flows are runny "
    "because they hold little silica.\n\n## Mauna Loa\n\nMauna Loa in Hawaii is the largest active volcano on "
    "Earth.\n",
    "bread.md": "# Sourdough\n\nA sourdough starter is flour and water fermented by wild yeast and lactic "
    "bacteria. Feed it daily.\n\n## Baking\n\nBake the loaf at 230 degrees in a covered pot for the first twenty "
    "minutes.\n",
    "chess.md": "# Chess\n\nCastling moves the king two squares towards a rook. It is not allowed while the king "
    "is in check.\n\n## En passant\n\nA pawn may capture a pawn that has just moved two squares past it.\n",
}


def write_corpus(root: Path, docs: dict[str, str] = DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def encoder():
    from lmlab.rag.encoder import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "notes")


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, corpus, encoder) -> Path:
    """The corpus indexed with small chunks (so that documents have several)."""
    from lmlab.rag.index import build_index

    out = tmp_path_factory.mktemp("index") / "notes.sqlite"
    build_index([corpus], out, encoder, chunk_tokens=16, overlap=4)
    return out
