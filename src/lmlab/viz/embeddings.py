"""Embedding maps: sentence embeddings projected to 2-D (PCA; UMAP when installed), coloured by label.

Drawn for the same texts under several models (a base and its fine-tuned checkpoint, say), one panel
each, they show whether fine-tuning pulled the classes apart.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_json
from lmlab.viz import style


def pca(x: torch.Tensor | np.ndarray, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project rows of x (N, d) on their top-k principal components.

    Returns (coordinates (N, k), explained-variance ratio (k,), components (k, d)), in float64, with
    scikit-learn's sign convention: the largest-magnitude entry of each component is positive.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise LmlabError(f"PCA needs at least 2 rows of vectors, got shape {tuple(x.shape)}")
    k = min(k, *x.shape)
    xc = x - x.mean(0)
    # exact thin SVD: cheap for sentence embeddings (d in the hundreds), and deterministic where
    # torch.pca_lowrank's randomized range finder is not
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = vh[:k]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))  # (k, 1)
    comps = comps * sign
    var = s**2
    return xc @ comps.T, var[:k] / var.sum().clamp(min=1e-300), comps


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """UMAP coordinates (N, 2) when umap-learn is installed, else None."""
    try:
        import umap
    except ImportError:
        return None
    neighbors = max(2, min(15, len(x) - 1))
    return umap.UMAP(n_components=2, n_neighbors=neighbors, random_state=seed).fit_transform(x)


def read_labelled(
    path: str | os.PathLike, label_field: str, text_field: str = "text", limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(texts, labels) from a JSON-lines file; with limit, a seeded sample of that many rows in file order."""
    from lmlab.finetune.task_data import iter_jsonl

    texts, labels = [], []
    for n, obj in iter_jsonl(path):
        for field in (text_field, label_field):
            if field not in obj:
                raise LmlabError("missing field", file=str(path), line=n, field=field)
        if not isinstance(obj[text_field], str) or not obj[text_field].strip():
            raise LmlabError("expected a non-empty string", file=str(path), line=n, field=text_field)
        texts.append(obj[text_field])
        labels.append(str(obj[label_field]))
    if len(texts) < 2:
        raise LmlabError("an embedding map needs at least 2 texts", file=str(path))
    if limit is not None and limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def plot_map(
    panels: Sequence[tuple[str, np.ndarray]], labels: Sequence[str], path: str | os.PathLike, title: str,
    axis: str = "PC",
) -> Path:  # fmt: skip
    """Scatter plots side by side (one per (panel title, coordinates (N, 2))), points coloured by label."""
    from lmlab.viz.figure import pyplot, save_png

    plt = pyplot()
    classes = sorted(set(labels))
    style.check_glyphs(title, *classes, *(t for t, _ in panels))
    labels_arr = np.asarray(labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.2, 4.4), squeeze=False)
    for ax, (name, xy) in zip(axes[0], panels):
        for j, c in enumerate(classes):
            sel = labels_arr == c
            colour = style.PALETTE[j % len(style.PALETTE)]
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.7, color=colour, label=f"{c} ({int(sel.sum())})")
        ax.set_title(name)
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
    axes[0][-1].legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def separation(xy: np.ndarray, labels: Sequence[str]) -> float:
    """Between-class over total variance of 2-D points (0: classes overlap, 1: each class is a point)."""
    xy = np.asarray(xy, dtype=np.float64)
    labels_arr = np.asarray(labels)
    total = ((xy - xy.mean(0)) ** 2).sum()
    between = sum((labels_arr == c).sum() * ((xy[labels_arr == c].mean(0) - xy.mean(0)) ** 2).sum()
                  for c in set(labels))  # fmt: skip
    return float(between / total) if total > 0 else 0.0


def embedding_map(
    models: Sequence[str],
    input_path: str | os.PathLike,
    label_field: str,
    out: str | os.PathLike,
    text_field: str = "text",
    pooling: str = "mean",
    limit: int | None = 1000,
    seed: int = 0,
    max_len: int = 128,
) -> dict[str, Any]:
    """Embed the labelled texts of a JSON-lines file with each model and write out/embeddings-pca.png
    (and out/embeddings-umap.png with umap-learn) plus out/embeddings.json; returns the latter."""
    from lmlab.finetune.embed import embed
    from lmlab.model.checkpoint import load_pretrained

    if not models:
        raise LmlabError("give at least one model", field="model")
    texts, labels = read_labelled(input_path, label_field, text_field, limit, seed)
    out = Path(out)
    data = f"{_short_name(str(input_path))}, {len(texts)} texts"
    pcs, umaps, summary = [], [], []
    for name in models:
        model, tokenizer = load_pretrained(name)
        if tokenizer is None:
            raise LmlabError("the checkpoint has no tokenizer", file=str(name))
        vectors = embed(model, tokenizer, texts, pooling=pooling, max_len=max_len)
        xy, ratio, _ = pca(vectors)
        short = _short_name(name)
        pcs.append((f"{short}\n(PC1 {ratio[0]:.0%}, PC2 {ratio[1]:.0%} of variance)", xy.numpy()))
        row = {"model": str(name), "explained_variance": ratio.tolist(), "separation_pca": separation(xy, labels)}
        u = umap_2d(vectors, seed)
        if u is not None:
            umaps.append((short, u))
            row["separation_umap"] = separation(u, labels)
        summary.append(row)
    what = f"Sentence embeddings ({pooling} pooling) by label"
    images = [
        str(plot_map(pcs, labels, out / "embeddings-pca.png", style.title(f"PCA of {what[0].lower()}{what[1:]}", data)))
    ]
    if umaps:
        umap_title = style.title(f"UMAP of {what[0].lower()}{what[1:]}", data)
        images.append(str(plot_map(umaps, labels, out / "embeddings-umap.png", umap_title, axis="UMAP")))
    result = {"input": str(input_path), "n": len(texts), "labels": sorted(set(labels)), "models": summary,
              "images": images, "umap": bool(umaps)}  # fmt: skip
    write_json(out / "embeddings.json", result)
    return result


def _short_name(name: str) -> str:
    """The last two parts of a path (…/minilm-tweets/final), or the packaged name."""
    parts = Path(str(name)).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(name)
