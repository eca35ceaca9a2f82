"""Instruction SFT data: chat/Alpaca JSONL -> token ids with a loss mask on assistant tokens -> packed batches.

The flow: `read_sft_jsonl` (validated conversations) -> `render_example` (the checkpoint's chat template; labels
are the token id on assistant tokens, -100 elsewhere) -> `SFTDataset.get_batch(step)` (packed rows with
position_ids/document_ids, or padded rows with attention_mask) -> `sft_loss(model, batch)`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer

IGNORE = -100  # label of tokens that carry no loss (cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


# -- reading ----------------------------------------------------------------------------------


def _conversation(record: Any, file: str, line: int) -> Messages:
    """One validated conversation from a chat record ({"messages": [...]}) or an Alpaca record."""
    if not isinstance(record, dict):
        raise LmlabError("each line must be a JSON object", file=file, line=line)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise LmlabError("must be a non-empty list of {role, content}", file=file, line=line, field="messages")
        out: Messages = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise LmlabError("must be an object with role and content", file=file, line=line, field=where)
            if m.get("role") not in ROLES:
                raise LmlabError(
                    f"role must be one of {', '.join(ROLES)}, not {m.get('role')!r}",
                    file=file, line=line, field=f"{where}.role",
                )  # fmt: skip
            if not isinstance(m.get("content"), str):
                raise LmlabError(
                    f"content must be a string, not {type(m.get('content')).__name__}",
                    file=file, line=line, field=f"{where}.content",
                )  # fmt: skip
            # keep only what templates read, so extra keys cannot change the rendering
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise LmlabError(
                "conversation has no assistant turn, so nothing to learn", file=file, line=line, field="messages"
            )
        return out
    if "instruction" in record:
        for key, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
            value = record.get(key)
            if (required or value is not None) and not isinstance(value, str):
                what = "is missing" if key not in record else f"must be a string, not {type(value).__name__}"
                raise LmlabError(what, file=file, line=line, field=key)
        user = record["instruction"]
        if record.get("input"):
            user += "\n\n" + record["input"]
        out = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        return [*out, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise LmlabError(
        "needs 'messages' (chat) or 'instruction' and 'output' (Alpaca)", file=file, line=line, field="messages"
    )


def read_sft_jsonl(path: str | os.PathLike) -> list[Messages]:
    """Conversations from a chat ({"messages": [...]}) or Alpaca ({"instruction", "input", "output"}) JSONL file."""
    from lmlab.finetune.task_data import iter_jsonl

    conversations = [_conversation(record, str(path), n) for n, record in iter_jsonl(path)]
    if not conversations:
        raise LmlabError("no conversations in this file", file=str(path))
    return conversations


def load_conversations(source: str | os.PathLike | Iterable[Any]) -> list[Messages]:
    """Conversations from a JSONL path, a list of paths, or in-memory records (chat or Alpaca dicts)."""
    if isinstance(source, (str, os.PathLike)):
        return read_sft_jsonl(source)
    items = list(source)
    if items and all(isinstance(x, (str, os.PathLike)) for x in items):
        return [c for p in items for c in read_sft_jsonl(p)]
    return [_conversation(r, "<records>", i + 1) for i, r in enumerate(items)]


# -- rendering --------------------------------------------------------------------------------


@dataclass
class SFTExample:
    """One tokenized conversation: labels[t] == input_ids[t] on assistant tokens, -100 elsewhere (not shifted)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are targets of the loss."""
        return sum(label != IGNORE for label in self.labels)


def assistant_char_spans(tokenizer: Tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn in it.

    A turn's span is what the template adds after the generation prompt (content and end-of-turn token),
    without the whitespace it emits after the end token: the model should stop at the end token.
    """
    full = tokenizer.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1])
        turn = through[len(prompt) :].rstrip()
        start, end = len(prompt), len(prompt) + len(turn)
        if not (through.startswith(prompt) and full.startswith(prompt) and full[start:end] == turn):
            raise LmlabError(
                f"the chat template is not prefix-stable at message {i}: rendering the conversation up to an "
                "assistant turn (with the generation prompt) is not a prefix of the whole conversation, "
                "so the assistant tokens cannot be located",
                field="chat_template",
                hint="use a template that renders earlier turns the same way whatever follows",
            )
        spans.append((start, end))
    return full, spans


def render_example(tokenizer: Tokenizer, messages: Messages, max_len: int | None = None) -> SFTExample:
    """Token ids of `messages` under the checkpoint's chat template, with loss on exactly the assistant tokens.

    Tokens come from one encoding of the whole text, so boundaries are the ones the model sees; a token belongs
    to an assistant turn when its first character does (its offset). Truncation keeps the first max_len tokens.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)  # as apply_chat_template(tokenize=True)
    in_turn = np.zeros(len(text) + 1, dtype=bool)
    for start, end in spans:
        in_turn[start:end] = True
    ids = list(enc.ids)
    labels = [i if in_turn[min(s, len(text))] else IGNORE for i, (s, _) in zip(ids, enc.offsets)]
    if labels:
        # the first token has no predecessor: it is never a target, and in a packed row this keeps the
        # previous document's last token from being trained to predict it
        labels[0] = IGNORE
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    return SFTExample(ids, labels, truncated)


# -- loss -------------------------------------------------------------------------------------


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's assistant tokens (labels != -100, shifted here).

    position_ids / document_ids / attention_mask are passed to the model when present. With `token_scale`
    (set by SFTDataset), the value is this micro-batch's share of the global batch's token mean, so the
    Trainer's average over equal micro-batches and processes is exactly the mean over all assistant tokens.
    """
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids", "document_ids") if k in batch}
    input_ids, labels = batch["input_ids"], batch["labels"]
    targets = labels[:, 1:]
    if "document_ids" in batch:
        # never let one packed document's last token predict the next document's first token
        docs = batch["document_ids"]
        targets = targets.masked_fill(docs[:, 1:] != docs[:, :-1], IGNORE)
    # the vocabulary projection and the cross-entropy run on the counted positions only, in chunks
    nll = model(input_ids, targets=F.pad(targets, (0, 1), value=IGNORE), reduction="sum", **kwargs)
    if "token_scale" in batch:
        return nll * batch["token_scale"][0].to(nll.dtype) / input_ids.shape[0]
    return nll / (targets != IGNORE).sum().clamp(min=1)  # a batch without targets gives 0, not NaN


# -- batches ----------------------------------------------------------------------------------


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing in O(n log n): each item goes to the first row with room for it."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    # a max-tree of free room over rows; rows not opened yet are empty, so the leftmost fit is the answer
    free = [capacity] * (2 * size)
    rows: list[list[int]] = []
    for i, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"item {i} has length {length}, outside 1..{capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


@dataclass
class SFTStats:
    """What the data holds and how well it packs (efficiency measured on epoch 0)."""

    examples: int
    truncated: int  # examples cut to block_size, dropped ones included
    dropped: int  # examples left out because no assistant token survived truncation
    tokens: int
    assistant_tokens: int
    rows_per_epoch: int
    steps_per_epoch: int
    packing_efficiency: float  # real tokens / tokens in the rows the model runs on

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for logs and JSON."""
        return asdict(self)


class SFTDataset:
    """Global batches of SFT examples for `Trainer`: `get_batch(step)` is a pure function of (data, seed, step).

    pack=True: each epoch's examples, in that epoch's shuffled order, go first-fit into rows of exactly
    block_size tokens (whole examples only; the rest of a row is padding with document id -1 and label -100);
    rows are shuffled and cut into batches of batch_size rows. Each example is in exactly one row per epoch,
    so an epoch's last batch may end with empty rows. Epochs may differ by a step since each packs its own order.
    pack=False: one example per row, right-padded to the batch's longest, with attention_mask.
    Examples longer than block_size are truncated to it (counted in `truncated`).
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        batch_size: int,
        block_size: int,
        pack: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        global_token_mean: bool = True,
    ) -> None:
        if not examples:
            raise LmlabError("no SFT examples", hint="check the data file")
        if batch_size < 1 or block_size < 2:
            raise LmlabError(f"need batch_size >= 1 and block_size >= 2, not {batch_size} and {block_size}")
        self.batch_size, self.block_size, self.pack, self.shuffle = batch_size, block_size, pack, shuffle
        self.seed, self.pad_id, self.global_token_mean = seed, pad_id, global_token_mean
        self.examples: list[SFTExample] = []
        for i, ex in enumerate(examples):
            if len(ex) == 0 or len(ex.labels) != len(ex):
                raise LmlabError(f"example {i} is empty or its labels do not match its ids", field="examples")
            if len(ex) > block_size:
                ex = SFTExample(ex.input_ids[:block_size], ex.labels[:block_size], True)
            self.examples.append(ex)
        self.lengths = np.array([len(ex) for ex in self.examples], dtype=np.int64)
        self._plans: dict[int, list[list[list[int]]]] = {}  # epoch -> batches -> rows -> example indices
        self._epoch_steps: list[int] = []  # steps of epochs 0, 1, ... as far as planned
        self._fingerprint: str | None = None

    # -- the order of the data ----------------------------------------------------------------
    def _plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch in self._plans:
            return self._plans[epoch]
        n = len(self.examples)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.pack:
            rows = [[int(order[j]) for j in row] for row in first_fit(self.lengths[order].tolist(), self.block_size)]
            if self.shuffle:  # first-fit leaves long examples in the last rows: spread them over the epoch
                rows = [rows[j] for j in rng.permutation(len(rows))]
        else:
            rows = [[int(i)] for i in order]
        plan = [rows[j : j + self.batch_size] for j in range(0, len(rows), self.batch_size)]
        if len(self._plans) >= 2:  # training walks epochs in order: the current and the next are enough
            self._plans.pop(min(self._plans))
        self._plans[epoch] = plan
        return plan

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps (global batches) in one epoch."""
        while len(self._epoch_steps) <= epoch:
            self._epoch_steps.append(len(self._plan(len(self._epoch_steps))))
        return self._epoch_steps[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Steps in epoch 0 (later packed epochs can differ slightly; `steps_for_epochs` gives exact totals)."""
        return self.steps_in_epoch(0)

    def steps_for_epochs(self, epochs: int) -> int:
        """Steps that make exactly `epochs` whole epochs."""
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def _locate(self, step: int) -> tuple[int, int]:
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def epoch(self, step: int) -> int:
        """The epoch that batch `step` belongs to."""
        return self._locate(step)[0]

    def batch_examples(self, step: int) -> list[list[int]]:
        """Which examples batch `step` holds: one list of example indices per row (empty for filler rows)."""
        epoch, k = self._locate(step)
        rows = self._plan(epoch)[k]
        return rows + [[] for _ in range(self.batch_size - len(rows))]

    # -- the batch ----------------------------------------------------------------------------
    def get_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The global batch of optimizer step `step`: LongTensors (batch_size, T), plus float `token_scale`."""
        rows = self.batch_examples(step)
        width = (
            self.block_size if self.pack else max(max((int(self.lengths[i]) for r in rows for i in r), default=1), 2)
        )
        shape = (self.batch_size, width)
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        docs = np.full(shape, -1, dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for doc, i in enumerate(row):
                ex, n = self.examples[i], int(self.lengths[i])
                ids[r, at : at + n] = ex.input_ids
                labels[r, at : at + n] = ex.labels
                labels[r, at] = IGNORE  # a document's first token is never a target (see render_example)
                positions[r, at : at + n] = np.arange(n)
                docs[r, at : at + n] = doc
                at += n
            positions[r, at:] = np.arange(width - at)  # filler is its own "document": positions stay in range
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.pack:
            batch["position_ids"] = torch.from_numpy(positions)
            batch["document_ids"] = torch.from_numpy(docs)
        else:
            # position ids follow from the mask (right padding); filler rows have no real token at all
            batch["attention_mask"] = torch.from_numpy((docs >= 0).astype(np.int64))
        if self.global_token_mean:
            targets = int((labels[:, 1:] != IGNORE).sum())
            scale = self.batch_size / targets if targets else 0.0
            batch["token_scale"] = torch.full((self.batch_size,), scale, dtype=torch.float32)
        return batch

    # -- resume and stats ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A hash of the examples' ids and labels: resuming on different data would silently change the order."""
        if self._fingerprint is None:  # every checkpoint asks: hash once (seconds on a large set)
            h = hashlib.sha256(self.lengths.tobytes())
            for ex in self.examples:
                h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
                h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """What fixes the data order. The position itself is the Trainer's step: batches are a function of it."""
        return {"seed": self.seed, "batch_size": self.batch_size, "block_size": self.block_size,
                "pack": self.pack, "shuffle": self.shuffle, "fingerprint": self.fingerprint()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a resumed run sees the same data in the same order (same examples, seed and shapes)."""
        mine = self.state_dict()
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise LmlabError(
                    f"resume state has {key}={state[key]!r}, this data has {value!r}; the batch order would differ",
                    field=key,
                    hint="resume with the same data file, seed, batch size, block size and packing",
                )

    def stats(self, dropped: int = 0, dropped_truncated: int = 0) -> SFTStats:
        """Counts and packing efficiency (real tokens / tokens of the rows run in epoch 0).

        `dropped` / `dropped_truncated`: examples the caller left out before building the dataset (and how many
        of those were truncated), so that the counts describe the whole data file.
        """
        row_tokens = 0
        for batch in self._plan(0):
            width = self.block_size if self.pack else max(int(self.lengths[i]) for r in batch for i in r)
            row_tokens += self.batch_size * width
        return SFTStats(
            examples=len(self.examples),
            truncated=sum(ex.truncated for ex in self.examples) + dropped_truncated,
            dropped=dropped,
            tokens=int(self.lengths.sum()),
            assistant_tokens=sum(ex.num_loss_tokens for ex in self.examples),
            rows_per_epoch=sum(len(b) for b in self._plan(0)),
            steps_per_epoch=self.steps_per_epoch,
            packing_efficiency=float(self.lengths.sum()) / max(row_tokens, 1),
        )


def build_sft_data(
    tokenizer: Tokenizer,
    source: str | os.PathLike | Iterable[Any],
    block_size: int,
    batch_size: int,
    *,
    pack: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    pad_id: int | None = None,
) -> tuple[SFTDataset, SFTStats]:
    """Read, render and batch SFT data in one call: (dataset, stats with the truncation count)."""
    conversations = load_conversations(source)
    examples = [render_example(tokenizer, m, max_len=block_size) for m in conversations]
    # a conversation whose replies all lie past block_size has nothing to learn from: leave it out, counted
    kept = [ex for ex in examples if ex.num_loss_tokens > 0]
    dropped = [ex for ex in examples if ex.num_loss_tokens == 0]
    if not kept:
        raise LmlabError(f"no example keeps an assistant token within block_size={block_size}", hint="raise block_size")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data = SFTDataset(kept, batch_size, block_size, pack=pack, shuffle=shuffle, seed=seed, pad_id=pad_id)
    return data, data.stats(dropped=len(dropped), dropped_truncated=sum(ex.truncated for ex in dropped))
