"""A tokenizer: a `tokenizers.Tokenizer` plus special tokens and a chat template, in Hugging Face's files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders

from lmlab.errors import LmlabError
from lmlab.tokenizer.chat_template import render_chat
from lmlab.utils.atomic import atomic_path, write_json, write_text


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: each printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


def _content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """Encode/decode text and render chats, as transformers' fast tokenizer does for the same files."""

    def __init__(
        self, backend: Backend, config: dict[str, Any] | None = None, chat_template: str | None = None
    ) -> None:
        self.backend = backend
        # padding and truncation are per-call choices (as in transformers), not stored state
        backend.no_padding()
        backend.no_truncation()
        self.config = dict(config or {})
        self.special = {name: _content(self.config.get(name)) for name in SPECIAL_NAMES}
        template = chat_template or self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template: str | None = template

    def __repr__(self) -> str:
        specials = {k: v for k, v in self.special.items() if v is not None}
        return f"Tokenizer(vocab_size={self.vocab_size}, special={specials}, chat_template={self.chat_template is not None})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        """Id of a token string, or None."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special["bos_token"])

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special["eos_token"])

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.special["pad_token"])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens (BOS, [CLS]...) are added as the tokenizer's post-processor says."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry of one id."""
        return self.backend.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes one token stands for: a byte-level token may hold part of a UTF-8 character."""
        token = self.backend.id_to_token(i)
        byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)
        if byte_level and token is not None and all(c in _BYTE_DECODER for c in token):
            return bytes(_BYTE_DECODER[c] for c in token)
        return self.decode([i]).encode("utf-8")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the checkpoint's template (text, or ids with tokenize=True)."""
        template = chat_template or self.chat_template
        if template is None:
            raise LmlabError(
                "this tokenizer has no chat template", hint="pass chat_template=... or use a chat checkpoint"
            )
        text = render_chat(
            template, messages, add_generation_prompt=add_generation_prompt, special_tokens=self.special, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) that transformers loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        config = {k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update({k: v for k, v in self.special.items() if v is not None})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            write_text(directory / "chat_template.jinja", self.chat_template)
        write_json(directory / "tokenizer_config.json", config)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a Hugging Face directory (tokenizer.json + tokenizer_config.json) or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from lmlab.tokenizer.gguf import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    file = path / "tokenizer.json"
    if not file.exists():
        raise LmlabError("no tokenizer.json here", file=str(path), hint="lmlab reads fast-tokenizer files only")
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # the Rust library's message says what is wrong
        raise LmlabError(f"cannot read tokenizer: {e}", file=str(file)) from None
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            try:
                config.update(json.loads(f.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise LmlabError(f"invalid JSON: {e.msg}", file=str(f), line=e.lineno) from None
    template_file = path / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else None
    if template is None and (path / "chat_template.json").exists():
        template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return Tokenizer(backend, config, template)
