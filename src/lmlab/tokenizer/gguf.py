"""Reading GGUF files (llama.cpp's format): the file itself and the tokenizer in its metadata.

The tokenizer lives below the model (ARCHITECTURE.md), so the GGUF reader starts here; `model/gguf.py`
reads the weights and configuration on top of it.
"""

from __future__ import annotations

import os
from typing import Any

from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer

# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with (None: GPT-2's)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}


def open_gguf(path: str | os.PathLike) -> Any:
    """A gguf.GGUFReader over the file (memory-mapped); a clear error when it is not GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise LmlabError(f"not a readable GGUF file: {e}", file=str(path)) from None


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of one metadata key, or `default`."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_tokenizer(path_or_reader: Any) -> Tokenizer:
    """The byte-level BPE tokenizer, special tokens and chat template stored in a GGUF file's metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    reader = path_or_reader if hasattr(path_or_reader, "fields") else open_gguf(path_or_reader)
    source = str(getattr(reader, "path", path_or_reader))
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmlabError(f"GGUF tokenizer {kind!r} is not supported; supported: gpt2 (byte-level BPE)", file=source)
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None))
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if pre == "smollm":  # digits one by one, then GPT-2's split
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    backend.add_special_tokens(control)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

    def tok(key: str) -> str | None:
        i = gguf_field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id")}
    config.update(unk_token=tok("unknown_token_id"), pad_token=tok("padding_token_id"))
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False))
    config["add_bos_token"] = add_bos
    if add_bos and config["bos_token"] is not None:
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    config = {k: v for k, v in config.items() if v is not None}
    return Tokenizer(backend, config, gguf_field(reader, "tokenizer.chat_template"))
