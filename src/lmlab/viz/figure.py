"""Matplotlib without a display, in the shared style (style.py), and figures saved atomically as PNG."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from lmlab.utils.atomic import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no screen needed), with the shared style applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.viz import style

    style.apply(plt)
    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a figure as PNG (temp file + rename) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (for inlining in a page), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
