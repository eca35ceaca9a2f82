"""Tokenizer training: byte-level BPE with Hugging Face `tokenizers`, digits split, CJK apart from Latin."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "im_start": "<|im_start|>",  # chat role markers: <|im_start|>user ... <|im_end|>
    "im_end": "<|im_end|>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Pre-tokenization, in the GPT-4/Qwen style with two changes for Chinese and numbers:
#  - Han (and kana/hangul) runs are pieces of their own, never glued to Latin letters or punctuation,
#    so BPE learns Chinese words from Chinese text alone;
#  - every digit is its own piece, so numbers tokenize uniformly (arithmetic sees one digit at a time).
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
SPLIT_PATTERN = (
    rf"[{_CJK}]+"
    r"|(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    rf"|[^\r\n\p{{L}}\p{{N}}{_CJK}]?[^\P{{L}}{_CJK}]+"
    r"|\p{N}"
    rf"| ?[^\s\p{{L}}\p{{N}}{_CJK}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_backend() -> Backend:
    """An untrained byte-level BPE with lmlab's pre-tokenizer; no normalizer, so decode(encode(x)) == x."""
    tok = Backend(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: dict[str, str] | None = None,
    progress: bool = True,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on a stream of texts; returns an lmlab Tokenizer with a ChatML template."""
    special = dict(special_tokens or SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special):
        raise LmlabError(
            f"vocab size {vocab_size} is below the 256 bytes plus {len(special)} special tokens", field="vocab_size"
        )
    tok = build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special.values()),  # ids 0.. in this order
        initial_alphabet=alphabet,  # all 256 bytes: any text encodes, emoji and rare CJK included
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    config = {k: v for k, v in special.items() if k.endswith("_token")}
    config.update(model_max_length=1_000_000, clean_up_tokenization_spaces=False, add_bos_token=False)
    config["additional_special_tokens"] = [v for k, v in special.items() if not k.endswith("_token")]
    return Tokenizer(tok, config, CHAT_TEMPLATE)


def _limited(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for t in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(t)
        yield t


def train_tokenizer_files(
    inputs: list[str | os.PathLike],
    vocab_size: int,
    out: str | os.PathLike,
    text_field: str = "text",
    max_chars: int | None = None,
    min_frequency: int = 2,
    progress: bool = True,
) -> Tokenizer:
    """Train on files/folders (.txt, .jsonl, .jsonl.gz, .parquet), streaming; saves tokenizer.json + config in `out`."""
    from lmlab.data.readers import iter_texts

    tok = train_tokenizer(
        _limited(iter_texts(inputs, text_field), max_chars), vocab_size, min_frequency, progress=progress
    )
    if tok.vocab_size < 300:
        raise LmlabError("too little text to learn any merges", hint="give more input or lower min_frequency")
    tok.save(Path(out))
    return tok
