"""Preference pairs and RL prompts: JSONL -> the checkpoint's chat template -> batches for the Trainer.

Pairs: {"prompt": str | "messages": [...], "chosen": str, "rejected": str, "margin"?: float}.
Prompts: {"prompt": str | "messages": [...], "answer"?: str}.
A pair is rendered as two conversations, prompt + chosen reply and prompt + rejected reply; the
completion mask marks the reply's tokens (its end-of-turn token included), the only ones that score.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.finetune.sft import ROLES, assistant_char_spans
from lmlab.finetune.task_data import iter_jsonl, pad_id
from lmlab.tokenizer.tokenizer import Tokenizer

Messages = list[dict[str, str]]


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class PairRecord:
    """One preference: a prompt (as messages) and two replies, the preferred one first."""

    messages: Messages
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass
class PromptRecord:
    """One RL prompt, with the reference answer a verifiable reward checks against (if any)."""

    messages: Messages
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other fields, passed to reward functions


def _messages(obj: dict[str, Any], file: str, line: int, drop_replies: bool = False) -> Messages:
    """The prompt of a record as chat messages ending with a user turn."""
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise LmlabError("must be a non-empty string", file=file, line=line, field="prompt")
        return [{"role": "user", "content": obj["prompt"]}]
    if "messages" not in obj:
        raise LmlabError("missing field: give 'prompt' (text) or 'messages' (chat)", file=file, line=line,
                         field="prompt")  # fmt: skip
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LmlabError("must be a non-empty list of {role, content}", file=file, line=line, field="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmlabError(f"must be {{role: {'|'.join(ROLES)}, content: string}}", file=file, line=line,
                             field=where)  # fmt: skip
        out.append({"role": m["role"], "content": m["content"]})
    if drop_replies and out[-1]["role"] == "assistant" and any(m["role"] == "user" for m in out):
        # an RL prompt taken from a dialogue set: the policy writes its own reply
        while out[-1]["role"] == "assistant":
            out.pop()
    if out[-1]["role"] != "user":
        raise LmlabError("the prompt must end with a user turn (the reply is what is scored)", file=file, line=line,
                         field=f"messages[{len(out) - 1}].role")  # fmt: skip
    return out


def _string(obj: dict[str, Any], name: str, file: str, line: int) -> str:
    if name not in obj:
        raise LmlabError("missing field", file=file, line=line, field=name)
    if not isinstance(obj[name], str):
        raise LmlabError(f"must be a string, not {type(obj[name]).__name__}", file=file, line=line, field=name)
    return obj[name]


def read_pairs(path: str | os.PathLike) -> list[PairRecord]:
    """Preference pairs from JSONL; errors name the file, line and field."""
    file, out = str(path), []
    for n, obj in iter_jsonl(path):
        margin = obj.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise LmlabError("must be a number", file=file, line=n, field="margin")
        out.append(PairRecord(_messages(obj, file, n), _string(obj, "chosen", file, n),
                              _string(obj, "rejected", file, n), float(margin)))  # fmt: skip
    if not out:
        raise LmlabError("no pairs in this file", file=file)
    return out


def read_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    """RL prompts from JSONL (an optional "answer" for verifiable rewards); chat records that end with
    assistant turns (a dialogue set) keep the conversation up to its last user turn."""
    file, out = str(path), []
    for n, obj in iter_jsonl(path):
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise LmlabError("must be a string or a number", file=file, line=n, field="answer")
        extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "answer")}
        messages = _messages(obj, file, n, drop_replies=True)
        out.append(PromptRecord(messages, None if answer is None else str(answer), extra))
    if not out:
        raise LmlabError("no prompts in this file", file=file)
    return out


# -- rendering --------------------------------------------------------------------------------------
def render_prompt(tokenizer: Tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt under the chat template, ending with the assistant's generation prompt."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)  # fmt: skip


def render_completion(
    tokenizer: Tokenizer, messages: Messages, completion: str, max_len: int | None = None
) -> tuple[list[int], list[int], bool]:
    """(ids, completion_mask, truncated) of prompt + reply; the mask is 1 on the reply's tokens.

    One encoding of the whole text (the boundaries the model sees); a token belongs to the reply when its
    first character does. Too long: the first max_len tokens are kept.
    """
    text, spans = assistant_char_spans(tokenizer, [*messages, {"role": "assistant", "content": completion}])
    start, end = spans[-1]
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [int(start <= s < end) for s, _ in enc.offsets]
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask, truncated


@dataclass
class PairExample:
    """A rendered pair: ids and completion masks of the chosen and the rejected conversation."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float = 0.0


def render_pairs(
    tokenizer: Tokenizer, pairs: list[PairRecord], max_len: int
) -> tuple[list[PairExample], dict[str, int]]:
    """Rendered pairs and counts; a pair whose reply is cut away entirely by max_len is left out."""
    out, truncated, dropped = [], 0, 0
    for p in pairs:
        c, cm, ct = render_completion(tokenizer, p.messages, p.chosen, max_len)
        r, rm, rt = render_completion(tokenizer, p.messages, p.rejected, max_len)
        truncated += ct or rt
        if not any(cm) or not any(rm):
            dropped += 1
            continue
        out.append(PairExample(c, cm, r, rm, p.margin))
    if not out:
        raise LmlabError(f"no pair keeps a reply token within {max_len} tokens", field="train.block_size",
                         hint="raise train.block_size")  # fmt: skip
    return out, {"pairs": len(out), "truncated": truncated, "dropped": dropped}


# -- batches ----------------------------------------------------------------------------------------
def epoch_order(n: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """The example indices of batch `step`: each epoch a seeded permutation cut into batches; the last batch
    of an epoch is topped up from the epoch's start so that every batch has batch_size rows."""
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    idx = order[k * batch_size : (k + 1) * batch_size].tolist()
    while len(idx) < batch_size:
        idx += order[: batch_size - len(idx)].tolist()
    return idx


def pad_rows(rows: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints into a LongTensor (len(rows), width)."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class PairDataset:
    """Global batches of pairs for the Trainer: `get_batch(step)` is a pure function of (data, seed, step).

    A batch holds (B, 2, T) input_ids / attention_mask / completion_mask (index 0 chosen, 1 rejected, right
    padding to the batch's longest), margin (B,), and ref_logps (B, 2) once `set_reference` gave them.
    """

    def __init__(
        self, examples: list[PairExample], batch_size: int, pad: int, shuffle: bool = True, seed: int = 0
    ) -> None:
        self.examples, self.batch_size, self.pad, self.shuffle, self.seed = examples, batch_size, pad, shuffle, seed
        self.ref: torch.Tensor | None = None  # (N, 2) reference log-probs of (chosen, rejected)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over the pairs."""
        return math.ceil(len(self.examples) / self.batch_size)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The batch of the given examples."""
        exs = [self.examples[i] for i in idx]
        rows = [r for e in exs for r in (e.chosen_ids, e.rejected_ids)]
        masks = [m for e in exs for m in (e.chosen_mask, e.rejected_mask)]
        B = len(exs)
        ids = pad_rows(rows, self.pad).view(B, 2, -1)
        attn = pad_rows([[1] * len(r) for r in rows], 0).view(B, 2, -1)
        comp = pad_rows(masks, 0).view(B, 2, -1)
        batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
                 "margin": torch.tensor([e.margin for e in exs], dtype=torch.float32)}  # fmt: skip
        if self.ref is not None:
            batch["ref_logps"] = self.ref[idx]
        return batch

    def get_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The global batch of optimizer step `step`."""
        return self.collate(epoch_order(len(self.examples), self.batch_size, step, self.seed, self.shuffle))

    def batches(self, batch_size: int):
        """Every pair once, in order (evaluation)."""
        for start in range(0, len(self.examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(self.examples))))
            yield idx, self.collate(idx)

    def set_reference(self, ref: torch.Tensor) -> None:
        """Attach the reference model's (chosen, rejected) log-probs (N, 2), cached once for the run."""
        if ref.shape != (len(self.examples), 2):
            raise ValueError(f"reference log-probs of shape {tuple(ref.shape)} for {len(self.examples)} pairs")
        self.ref = ref.float()

    def fingerprint(self) -> str:
        """A hash of the rendered pairs: cached reference log-probs and resumed runs must match the data."""
        h = hashlib.sha256()
        for e in self.examples:
            for part in (e.chosen_ids, e.chosen_mask, e.rejected_ids, e.rejected_mask):
                h.update(np.asarray(part, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """What fixes the order (the position is the Trainer's step)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume on other data, seed or batch size: the order would differ."""
        for key, value in self.state_dict().items():
            if key in state and state[key] != value:
                raise LmlabError(f"resume state has {key}={state[key]!r}, this data has {value!r}", field=key,
                                 hint="resume with the same data, seed and batch size")  # fmt: skip


def build_pairs(
    tokenizer: Tokenizer, source: str | os.PathLike | list[PairRecord], max_len: int, batch_size: int,
    *, shuffle: bool = True, seed: int = 0,
) -> tuple[PairDataset, dict[str, int]]:  # fmt: skip
    """Read (or take), render and batch preference pairs: (dataset, counts)."""
    pairs = source if isinstance(source, list) else read_pairs(source)
    examples, stats = render_pairs(tokenizer, pairs, max_len)
    return PairDataset(examples, batch_size, pad_id(tokenizer), shuffle, seed), stats
