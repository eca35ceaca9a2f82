"""One look for every plot: a colour-blind-safe palette, readable sizes, fonts that have CJK glyphs,
and titles that say what is shown and on which data."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

# Okabe & Ito's eight colours: distinguishable under the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
SEQUENTIAL = "viridis"  # heatmaps: perceptually uniform and colour-blind-safe
DIVERGING = "RdBu_r"

# families with Chinese, Japanese and Korean glyphs, best first (Debian: fonts-noto-cjk, fonts-wqy-*)
CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "Noto Serif CJK SC",
)
_CJK_FILE = re.compile(r"cjk|wqy|wenquanyi|droidsansfallback|sourcehan|uming|ukai", re.IGNORECASE)
_CJK_TEXT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


def _has_cjk_glyphs(path: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        charmap = FT2Font(path).get_charmap()
    except (OSError, RuntimeError):
        return False
    return all(ord(c) in charmap for c in "中文한日")


@functools.cache
def cjk_font() -> str | None:
    """The family name of an installed font with CJK glyphs, or None."""
    from matplotlib import font_manager as fm

    def known() -> str | None:
        by_name = {f.name: f.fname for f in fm.fontManager.ttflist}
        for name in CJK_FAMILIES:
            if name in by_name and _has_cjk_glyphs(by_name[name]):
                return name
        return None

    found = known()
    if found is None:
        # matplotlib's font cache may predate the font's install: add CJK-looking system fonts once
        for path in fm.findSystemFonts():
            if _CJK_FILE.search(Path(path).name):
                try:
                    fm.fontManager.addfont(path)
                except (OSError, RuntimeError):
                    continue
        found = known()
    return found


def has_cjk(text: str) -> bool:
    """Whether text holds Chinese, Japanese or Korean characters."""
    return bool(_CJK_TEXT.search(text))


@functools.cache
def _warn_no_cjk() -> None:
    warnings.warn(
        "no installed font has CJK glyphs, so Chinese/Japanese/Korean labels show as boxes; "
        "install one (Debian: apt-get install fonts-noto-cjk)",
        stacklevel=3,
    )


def check_glyphs(*texts: str) -> None:
    """Warn once when some text needs CJK glyphs and no font has them."""
    if any(has_cjk(t) for t in texts) and cjk_font() is None:
        _warn_no_cjk()


def apply(plt: Any) -> None:
    """Set the shared rcParams: palette, sizes, grid, fonts (Latin first, CJK as fallback)."""
    from cycler import cycler

    families = ["DejaVu Sans"] + ([cjk_font()] if cjk_font() else [])
    plt.rcParams.update(
        {
            "axes.prop_cycle": cycler(color=list(PALETTE)),
            "image.cmap": SEQUENTIAL,
            # a list of named families, not "sans-serif": matplotlib falls back glyph by glyph only along this
            "font.family": families,
            "font.size": 9,
            "axes.titlesize": 10,
            "figure.titlesize": 11,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            "savefig.bbox": "tight",
        }
    )


def title(what: str, data: str | None = None) -> str:
    """A plot title that says what is shown and on which data: 'what — data'."""
    return f"{what} — {data}" if data else what


def quote(text: str, width: int = 40) -> str:
    """Text as a short quoted one-liner for titles."""
    text = " ".join(text.split())
    return f"“{text if len(text) <= width else text[: width - 1] + '…'}”"
