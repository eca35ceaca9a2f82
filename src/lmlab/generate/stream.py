"""Turning tokens into text as they arrive: never half a character, and stop strings cut exactly."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lmlab.tokenizer.tokenizer import Tokenizer


class IncrementalDecoder:
    """Decode one token at a time into text pieces that are always valid, complete UTF-8.

    A byte-level token can hold part of a character (common in Chinese); decoding it alone gives
    U+FFFD. So each step decodes a short window of recent tokens and releases new text only when
    it no longer ends in U+FFFD. The window also keeps tokenizers that drop a leading space
    (SentencePiece) from losing spaces between pieces.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end; a character cut off by the token limit is dropped, not shown as U+FFFD."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        piece = self._decode(self.ids[self.prefix_offset :])[len(prefix) :].rstrip("\ufffd")
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece


class StopStrings:
    """Find the first stop string in a growing text, and hold back text that might begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Index where the first stop string starts, searching only where `text[new_from:]` could complete one."""
        start = max(0, new_from - self.longest + 1)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """How much of `text` can be shown: all but a tail that is a prefix of some stop string."""
        for keep in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - keep
        return len(text)


def text_pieces(tokens: Iterable[int], tokenizer: Tokenizer, eos: list[int], stop: list[str]) -> Iterator[str]:
    """The text of a stream of token ids as it becomes complete characters, up to the first EOS or stop
    string (never shown: text that could begin one is held back until it cannot). The caller's token
    source is not advanced past the token that ends the text."""
    decoder, stops, shown = IncrementalDecoder(tokenizer), StopStrings(stop), 0
    for tok in tokens:
        if tok in eos:
            break
        before = len(decoder.text)
        if not decoder.push(tok):
            continue
        at = stops.find(decoder.text, before)
        if at is not None:
            if at > shown:
                yield decoder.text[shown:at]
            return
        safe = stops.safe_end(decoder.text)
        if safe > shown:
            yield decoder.text[shown:safe]
            shown = safe
    decoder.flush()
    at = stops.find(decoder.text, shown)
    end = at if at is not None else len(decoder.text)
    if end > shown:
        yield decoder.text[shown:end]
