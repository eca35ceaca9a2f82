"""Tokenizers: Hugging Face `tokenizers` underneath, special tokens and chat templates on top."""

from lmlab.tokenizer.chat_template import render_chat
from lmlab.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "render_chat"]
