"""Data for sequence classification and token classification (NER): readers, label maps, class weights, batches.

Records are plain dicts. Classification: {"text": str, "label": str}. Token classification: {"tokens": [str],
"tags": [str]} with BIO tags; records read from the character-span format also keep "text" and "offsets" (the
character position of each token). Records read from a file carry "_file" and "_line" so that later errors
(an unknown label at evaluation, say) can point at the line.

Batches are dicts of LongTensors, right-padded to the longest row: input_ids, attention_mask, labels, and
token_type_ids for tokenizers that mark segments (BERT). `get_batch(step)` is a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.tokenizer.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value are skipped by cross-entropy (PyTorch's default ignore_index)
_BIO = re.compile(r"^(O|[BI]-\S.*)$")
WEIGHT_KINDS = ("inverse", "sqrt_inverse", "effective")


# -- reading ------------------------------------------------------------------------------------------------
def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError("no such file", file=str(path))
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmlabError(f"not UTF-8 ({e.reason} at byte {e.start})", file=str(path), line=n) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmlabError(f"invalid JSON: {e.msg} (column {e.colno})", file=str(path), line=n) from None
            if not isinstance(obj, dict):
                raise LmlabError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), line=n)
            yield n, obj


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], file: str, line: int) -> Any:
    if name not in obj:
        raise LmlabError("missing field", file=file, line=line, field=name)
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LmlabError(f"expected {want}, got {type(value).__name__}", file=file, line=line, field=name)
    return value


def _nonempty(records: list[dict[str, Any]], path: str | os.PathLike) -> list[dict[str, Any]]:
    if not records:
        raise LmlabError("no records in this file", file=str(path))
    return records


def read_classification_jsonl(
    path: str | os.PathLike, text_field: str = "text", label_field: str | None = "label"
) -> list[dict[str, Any]]:
    """Records {"text", "label"} from JSON lines; labels become strings (1 -> "1"); label_field=None reads text only."""
    file, records = str(path), []
    for n, obj in iter_jsonl(path):
        text = _field(obj, text_field, str, file, n)
        if not text.strip():
            raise LmlabError("empty text", file=file, line=n, field=text_field)
        record: dict[str, Any] = {"text": text, "_file": file, "_line": n}
        if label_field is not None:
            record["label"] = str(_field(obj, label_field, (str, int), file, n))
        records.append(record)
    return _nonempty(records, path)


def _check_tags(tags: list[Any], file: str | None, line: int | None, field: str) -> None:
    for j, tag in enumerate(tags):
        if not isinstance(tag, str) or not _BIO.match(tag):
            raise LmlabError(
                f"tag {j} is {tag!r}, not a BIO tag", file=file, line=line, field=field,
                hint="use O, B-TYPE and I-TYPE (IOB2); convert BIOES or integer tags first",
            )  # fmt: skip


def _spans_to_bio(
    text: str, entities: list[Any], file: str, line: int, field: str
) -> tuple[list[str], list[str], list[int]]:
    """Character tokens (whitespace dropped: no tokenizer gives it a token of its own), their BIO tags, offsets."""
    spans = []
    for k, ent in enumerate(entities):
        where = f"{field}[{k}]"
        if not isinstance(ent, dict):
            raise LmlabError(f"expected an object, got {type(ent).__name__}", file=file, line=line, field=where)
        start = _field(ent, "start", int, file, line)
        end = _field(ent, "end", int, file, line)
        kind = _field(ent, "type", str, file, line)
        if not 0 <= start < end <= len(text):
            raise LmlabError(
                f"span [{start}, {end}) is not inside the text of {len(text)} characters", file=file, line=line,
                field=where, hint="start and end are character offsets, end exclusive",
            )  # fmt: skip
        if not kind.strip() or any(c.isspace() for c in kind):
            raise LmlabError(f"entity type {kind!r} is empty or has spaces", file=file, line=line, field=where)
        if "text" in ent and ent["text"] != text[start:end]:
            raise LmlabError(
                f"span [{start}, {end}) is {text[start:end]!r} but the entity says {ent['text']!r}",
                file=file, line=line, field=where, hint="offsets count characters, not bytes; end is exclusive",
            )  # fmt: skip
        spans.append((start, end, kind, k))
    spans.sort()
    for (_, e0, _, k0), (s1, _, _, k1) in itertools.pairwise(spans):
        if s1 < e0:
            raise LmlabError(f"entities {k0} and {k1} overlap", file=file, line=line, field=field)
    tags = ["O"] * len(text)
    for start, end, kind, k in spans:
        kept = [i for i in range(start, end) if not text[i].isspace()]
        if not kept:
            raise LmlabError("entity is only whitespace", file=file, line=line, field=f"{field}[{k}]")
        tags[kept[0]] = f"B-{kind}"
        for i in kept[1:]:
            tags[i] = f"I-{kind}"
    offsets = [i for i, c in enumerate(text) if not c.isspace()]
    return [text[i] for i in offsets], [tags[i] for i in offsets], offsets


def read_ner_jsonl(
    path: str | os.PathLike,
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    text_field: str = "text",
    entities_field: str = "entities",
) -> list[dict[str, Any]]:
    """NER records {"tokens", "tags"} from JSON lines holding either tokens + BIO tags or text + character spans.

    The span format (people-daily's: {"text", "entities": [{"start", "end", "type"}]}, end exclusive) becomes one
    token per non-whitespace character, B- on an entity's first character and I- on the rest; overlapping spans
    are an error. I- tags that do not follow B-/I- of the same type are accepted and kept as they are: they start
    an entity, as in seqeval and conlleval (`ner_stats` counts them).
    """
    file, records = str(path), []
    for n, obj in iter_jsonl(path):
        record: dict[str, Any]
        if tokens_field in obj:
            tokens = _field(obj, tokens_field, list, file, n)
            if not tokens:
                raise LmlabError("empty token list", file=file, line=n, field=tokens_field)
            for j, tok in enumerate(tokens):
                if not isinstance(tok, str) or not tok.strip():
                    raise LmlabError(f"token {j} is {tok!r}, not a non-blank string", file=file, line=n,
                                     field=tokens_field)  # fmt: skip
            tags = _field(obj, tags_field, list, file, n)
            if len(tags) != len(tokens):
                raise LmlabError(f"{len(tags)} tags for {len(tokens)} tokens", file=file, line=n, field=tags_field)
            _check_tags(tags, file, n, tags_field)
            record = {"tokens": list(tokens), "tags": list(tags)}
        elif text_field in obj:
            text = _field(obj, text_field, str, file, n)
            if not text.strip():
                raise LmlabError("empty text", file=file, line=n, field=text_field)
            entities = _field(obj, entities_field, list, file, n)
            tokens, tags, offsets = _spans_to_bio(text, entities, file, n, entities_field)
            record = {"tokens": tokens, "tags": tags, "text": text, "offsets": offsets}
        else:
            raise LmlabError(
                f"neither {tokens_field!r} nor {text_field!r} is here", file=file, line=n,
                hint=f"write {tokens_field} + {tags_field} (BIO) or {text_field} + {entities_field} (character spans)",
            )  # fmt: skip
        records.append({**record, "_file": file, "_line": n})
    return _nonempty(records, path)


def ner_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sentences, tokens, entities per type, and I- tags that start an entity (no B- before them)."""
    entities: Counter[str] = Counter()
    orphans = tokens = 0
    for r in records:
        prev = "O"
        for tag in r["tags"]:
            if tag.startswith("B-"):
                entities[tag[2:]] += 1
            elif tag.startswith("I-") and prev[2:] != tag[2:]:
                entities[tag[2:]] += 1
                orphans += 1
            prev = tag
        tokens += len(r["tags"])
    return {"sentences": len(records), "tokens": tokens, "entities": dict(sorted(entities.items())),
            "i_without_b": orphans}  # fmt: skip


# -- labels -------------------------------------------------------------------------------------------------
def _natural_order(labels: set[str]) -> list[str]:
    # "2" before "10" when every label is an integer, so that 0/1/2 labels keep their own ids
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


class LabelMap:
    """Labels <-> ids, ids in the order given.

    `from_records` orders deterministically, independent of record order (so train and validation files, or a
    shuffled copy, agree): classification labels sorted (numerically if all are integers); NER tags as "O" first,
    then B-TYPE, I-TYPE for each type sorted, with both B- and I- present for every type seen.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        labels = [str(x) for x in labels]
        if not labels:
            raise LmlabError("a label map needs at least one label")
        if len(set(labels)) != len(labels):
            dup = next(x for x, c in Counter(labels).items() if c > 1)
            raise LmlabError(f"label {dup!r} appears twice")
        self.labels = labels
        self.label2id = {x: i for i, x in enumerate(labels)}
        self.id2label = dict(enumerate(labels))

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], field: str | None = None) -> LabelMap:
        """The labels ("label") or tags ("tags") seen in `records`, in the documented order."""
        if not records:
            raise LmlabError("no records to take labels from")
        field = field or ("tags" if "tags" in records[0] else "label")
        if field == "tags":
            for r in records:
                _check_tags(list(r[field]), r.get("_file"), r.get("_line"), field)
            types = {t[2:] for r in records for t in r[field] if t != "O"}
            return cls(["O", *(f"{p}-{t}" for t in sorted(types) for p in "BI")])
        missing = next((r for r in records if field not in r), None)
        if missing is not None:
            raise LmlabError("missing field", file=missing.get("_file"), line=missing.get("_line"), field=field)
        return cls(_natural_order({str(r[field]) for r in records}))

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str]) -> LabelMap:
        """From a config's id2label (keys may be strings of ints, as JSON writes them); ids must be 0..n-1."""
        ids = sorted(int(k) for k in id2label)
        if ids != list(range(len(ids))):
            raise LmlabError(f"id2label ids must be 0..{len(ids) - 1}, got {ids}", field="id2label")
        by_id = {int(k): v for k, v in id2label.items()}
        return cls([by_id[i] for i in ids])

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self.label2id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.labels == self.labels

    def __repr__(self) -> str:
        return f"LabelMap({self.labels})"

    @property
    def is_bio(self) -> bool:
        """Whether these are BIO tags (an NER label map)."""
        return "O" in self.label2id and all(_BIO.match(x) for x in self.labels)

    def encode(self, label: str, *, file: str | None = None, line: int | None = None) -> int:
        """The id of `label`; an unknown one is a user error naming the known labels."""
        i = self.label2id.get(str(label))
        if i is None:
            known = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise LmlabError(
                f"label {label!r} is not one of the {len(self)} labels the model knows ({known})",
                file=file, line=line, hint="fix the label, or train on data that has it",
            )  # fmt: skip
        return i

    def decode(self, i: int) -> str:
        """The label of id `i`."""
        return self.id2label[int(i)]


# -- imbalance ----------------------------------------------------------------------------------------------
def _ids(label_ids: Any) -> np.ndarray:
    if isinstance(label_ids, torch.Tensor):
        label_ids = label_ids.detach().cpu().numpy()
    return np.asarray(label_ids, dtype=np.int64).reshape(-1)


def class_weights(label_ids: Any, num_labels: int, kind: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights (num_labels,), mean 1 over the classes present; negative ids (-100) are ignored.

    inverse: 1/n_c. sqrt_inverse: 1/sqrt(n_c). effective: (1 - beta) / (1 - beta**n_c), the inverse "effective
    number of samples" of Cui et al. (2019). Classes absent from `label_ids` never occur as targets, so their
    weight does not matter: they get 1 and are left out of the normalization.
    """
    if kind not in WEIGHT_KINDS:
        raise LmlabError(f"unknown class weighting {kind!r}; choose one of {', '.join(WEIGHT_KINDS)}", field="kind")
    if kind == "effective" and not 0 < beta < 1:
        raise LmlabError(f"beta must be in (0, 1), got {beta}", field="beta")
    ids = _ids(label_ids)
    ids = ids[ids >= 0]
    if ids.size and ids.max() >= num_labels:
        raise LmlabError(f"label id {int(ids.max())} is out of range for {num_labels} labels")
    counts = np.bincount(ids, minlength=num_labels).astype(np.float64)
    present = counts > 0
    if not present.any():
        raise LmlabError("no labels to weight")
    n = counts[present]
    if kind == "inverse":
        w = 1.0 / n
    elif kind == "sqrt_inverse":
        w = 1.0 / np.sqrt(n)
    else:
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    out = np.ones(num_labels)
    out[present] = w / w.mean()
    return torch.tensor(out, dtype=torch.float32)


def resample_indices(label_ids: Any, mode: str = "oversample", seed: int | Sequence[int] = 0) -> np.ndarray:
    """Example indices (sorted) that balance the classes: oversample repeats minority examples up to the largest
    class (whole copies, then a random remainder without replacement); undersample keeps a random subset of each
    class as large as the smallest."""
    if mode not in ("oversample", "undersample"):
        raise LmlabError(f"resampling mode must be oversample or undersample, not {mode!r}", field="mode")
    ids = _ids(label_ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.min() < 0:
        raise LmlabError("negative label ids cannot be resampled")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(ids == c) for c in np.unique(ids)]
    sizes = [len(g) for g in groups]
    parts = []
    if mode == "oversample":
        target = max(sizes)
        for g in groups:
            parts += [np.tile(g, target // len(g)), rng.choice(g, target % len(g), replace=False)]
    else:
        target = min(sizes)
        parts = [rng.choice(g, target, replace=False) for g in groups]
    return np.sort(np.concatenate(parts)).astype(np.int64)


# -- tokenizing ---------------------------------------------------------------------------------------------
def pad_id(tokenizer: Tokenizer) -> int:
    """The id to pad with: the pad token, else EOS (decoders often have no pad token), else 0."""
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return i
    return 0


def uses_token_types(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer marks segments with token type ids (BERT does; GPT-2 and RoBERTa do not)."""
    backend = tokenizer.backend
    if backend.post_processor is None:  # a pair still gets type 1 on its second half; that means nothing here
        return False
    try:
        return 1 in backend.encode("a", "b").type_ids
    except Exception:  # a template with no pair form: single sentences only, no segments
        return False


def encode_truncated(
    tokenizer: Tokenizer, inputs: Sequence[Any], max_len: int, pretokenized: bool = False
) -> tuple[list[Any], int]:
    """(tokenizers Encodings with special tokens, how many were cut): content cut so the result fits in max_len.

    The same as transformers' `tokenizer(..., truncation=True, max_length=max_len)`: the special tokens stay.
    """
    backend = tokenizer.backend
    room = max_len - backend.num_special_tokens_to_add(False)
    if room < 1:
        raise LmlabError(f"max_len={max_len} leaves no room after the special tokens", field="max_len")
    out, cut = [], 0
    for enc in backend.encode_batch(list(inputs), is_pretokenized=pretokenized, add_special_tokens=False):
        if len(enc.ids) > room:
            enc.truncate(room)
            cut += 1
        out.append(backend.post_process(enc, None, True))
    return out, cut


# -- batches ------------------------------------------------------------------------------------------------
class _Batches:
    """The batch order shared by both datasets: a stream of per-epoch orders, batch k = stream[k*B : (k+1)*B]."""

    def __init__(
        self, n: int, batch_size: int, shuffle: bool, seed: int, sampling: str, class_ids: np.ndarray | None
    ) -> None:
        if batch_size < 1:
            raise LmlabError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
        if sampling not in ("uniform", "balanced"):
            raise LmlabError(f"sampling must be uniform or balanced, not {sampling!r}", field="sampling")
        if sampling == "balanced" and class_ids is None:
            raise LmlabError("balanced sampling needs a label on every example", field="sampling")
        self.num_examples, self.batch_size, self.shuffle, self.seed, self.sampling = (
            n,
            batch_size,
            shuffle,
            seed,
            sampling,
        )
        self._class_ids = class_ids
        # balanced: every class has as many examples per epoch as the largest one
        self.epoch_length = (
            n if sampling == "uniform" else int(np.bincount(class_ids).max() * len(np.unique(class_ids)))
        )
        self._orders: dict[int, np.ndarray] = {}
        self.step = 0

    def __len__(self) -> int:
        return self.num_examples

    @property
    def steps_per_epoch(self) -> int:
        """Batches that cover one epoch (the last one runs into the next epoch's order)."""
        return math.ceil(self.epoch_length / self.batch_size)

    def epoch_at(self, step: int) -> float:
        """Epochs completed (fractional) after `step` batches."""
        return step * self.batch_size / self.epoch_length

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if self.sampling == "balanced":
                order = resample_indices(self._class_ids, "oversample", seed=[self.seed, epoch, 1])
            else:
                order = np.arange(self.num_examples)
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            if len(self._orders) >= 4:  # a batch touches at most two epochs; keep the cache small
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of batch `step`."""
        out, pos, end = [], step * self.batch_size, (step + 1) * self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.epoch_length)
            take = min(end - pos, self.epoch_length - offset)
            out += self._order(epoch)[offset : offset + take].tolist()
            pos += take
        return out

    def _collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def get_batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The batch of optimizer step `step` (default: the next one, advancing the position)."""
        if step is None:
            step, self.step = self.step, self.step + 1
        return self._collate(self.indices(step))

    def iter_eval(self, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every example once, in record order, unshuffled; the last batch may be smaller."""
        size = batch_size or self.batch_size
        for start in range(0, self.num_examples, size):
            yield self._collate(range(start, min(start + size, self.num_examples)))

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings that fix the order, for a checkpoint."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "sampling": self.sampling, "num_examples": self.num_examples}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`; different settings or data would silently change the order, so they fail."""
        for key in ("seed", "batch_size", "shuffle", "sampling", "num_examples"):
            if state.get(key) != getattr(self, key):
                raise LmlabError(
                    f"resume state has {key}={state.get(key)!r}, this dataset has {getattr(self, key)!r}", field=key
                )
        self.step = int(state["step"])


def _labelled(records: Sequence[Mapping[str, Any]], field: str) -> bool:
    """True if every record has `field`, False if none has; a mix is an error."""
    have = [field in r for r in records]
    if all(have):
        return True
    if any(have):
        r = records[have.index(False)]
        raise LmlabError("missing field (other records have it)", file=r.get("_file"), line=r.get("_line"),
                         field=field)  # fmt: skip
    return False


def _pad(rows: Sequence[Sequence[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class _Encoded(_Batches):
    """Tokenized rows plus the collation both datasets share."""

    def _setup(
        self,
        tokenizer: Tokenizer,
        rows: list[list[int]],
        max_len: int,
        pad_to_max_len: bool,
        token_type_ids: bool | None,
    ) -> None:
        self.tokenizer, self.max_len, self.pad_to_max_len = tokenizer, max_len, pad_to_max_len
        self.pad_id = pad_id(tokenizer)
        self.token_type_ids = uses_token_types(tokenizer) if token_type_ids is None else token_type_ids
        self._rows = rows

    def _inputs(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self._rows[i] for i in indices]
        width = self.max_len if self.pad_to_max_len else max(map(len, rows))
        batch = {
            "input_ids": _pad(rows, self.pad_id, width),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, width),
        }
        if self.token_type_ids:  # single sentences: segment 0 throughout
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch


class ClassificationDataset(_Encoded):
    """Batches for sequence classification: {"input_ids", "attention_mask", ["token_type_ids"], "labels" (B,)}.

    Texts get the tokenizer's special tokens ([CLS] ... [SEP] for BERT) and are cut to max_len (counted in
    `truncated`). Rows are right-padded with the pad token (else EOS, else 0), to the longest row of the batch or
    to max_len with pad_to_max_len=True. Each epoch is a fresh permutation seeded by (seed, epoch) when
    shuffle=True; sampling="balanced" makes each epoch oversample every class up to the largest one.
    token_type_ids=None emits them for tokenizers that use them (BERT), all zeros. Records without a
    "label" (all of them) give batches without "labels", for prediction.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        records: Sequence[Mapping[str, Any]],
        label_map: LabelMap | None,
        batch_size: int,
        max_len: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        sampling: str = "uniform",
        pad_to_max_len: bool = False,
        token_type_ids: bool | None = None,
    ) -> None:
        if not records:
            raise LmlabError("no records")
        self.records, self.label_map = records, label_map
        labelled = _labelled(records, "label")
        if labelled and label_map is None:
            raise LmlabError("labelled records need a label map", hint="LabelMap.from_records(train_records)")
        self.labels = (
            np.array([label_map.encode(r["label"], file=r.get("_file"), line=r.get("_line")) for r in records])
            if labelled
            else None
        )
        super().__init__(len(records), batch_size, shuffle, seed, sampling, self.labels)
        encodings, self.truncated = encode_truncated(tokenizer, [r["text"] for r in records], max_len)
        self._setup(tokenizer, [e.ids for e in encodings], max_len, pad_to_max_len, token_type_ids)

    def _collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self._inputs(indices)
        if self.labels is not None:
            batch["labels"] = torch.tensor(self.labels[list(indices)], dtype=torch.long)
        return batch


class TokenClassificationDataset(_Encoded):
    """Batches for token classification (NER): like ClassificationDataset, with "labels" (B, T) per token.

    Words are encoded with `is_pretokenized=True`: the first sub-token of each word carries the word's tag id;
    later sub-tokens, special tokens and padding carry -100 (as transformers' NER examples do). Byte-level BPE
    words are encoded without a leading space, as transformers does with add_prefix_space=False. Sentences
    longer than max_len lose their last words (`truncated` sentences, `truncated_words` words); `word_tags`
    maps token predictions back to one tag per word, "O" for words that were cut or got no token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        records: Sequence[Mapping[str, Any]],
        label_map: LabelMap | None,
        batch_size: int,
        max_len: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        sampling: str = "uniform",
        pad_to_max_len: bool = False,
        token_type_ids: bool | None = None,
    ) -> None:
        if not records:
            raise LmlabError("no records")
        if sampling != "uniform":
            raise LmlabError("token classification supports sampling='uniform' only", field="sampling")
        self.records, self.label_map = records, label_map
        labelled = _labelled(records, "tags")
        if labelled and label_map is None:
            raise LmlabError("tagged records need a label map", hint="LabelMap.from_records(train_records)")
        super().__init__(len(records), batch_size, shuffle, seed, sampling, None)
        encodings, self.truncated = encode_truncated(tokenizer, [list(r["tokens"]) for r in records], max_len, True)
        self._setup(tokenizer, [e.ids for e in encodings], max_len, pad_to_max_len, token_type_ids)
        self.word_ids: list[list[int | None]] = [list(e.word_ids) for e in encodings]
        self.truncated_words = self.untokenized_words = 0
        self._labels: list[list[int]] | None = [] if labelled else None
        for r, words in zip(records, self.word_ids):
            seen = {w for w in words if w is not None}
            last = max(seen, default=-1)
            self.truncated_words += len(r["tokens"]) - 1 - last
            self.untokenized_words += sum(w not in seen for w in range(last + 1))
            if self._labels is not None:
                ids = [label_map.encode(t, file=r.get("_file"), line=r.get("_line")) for t in r["tags"]]
                self._labels.append(self._align(ids, words))

    @property
    def labels(self) -> np.ndarray | None:
        """Every token's label id, flat, -100 included (what `class_weights` takes); None without tags."""
        return None if self._labels is None else np.array([x for row in self._labels for x in row], dtype=np.int64)

    @staticmethod
    def _align(word_labels: Sequence[int], word_ids: Sequence[int | None]) -> list[int]:
        out, prev = [], None
        for w in word_ids:
            out.append(word_labels[w] if w is not None and w != prev else IGNORE_INDEX)
            prev = w
        return out

    def _collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self._inputs(indices)
        if self._labels is not None:
            batch["labels"] = _pad([self._labels[i] for i in indices], IGNORE_INDEX, batch["input_ids"].shape[1])
        return batch

    def word_tags(self, i: int, token_label_ids: Sequence[int]) -> list[str]:
        """One tag per word of example i from per-token predicted ids (padding beyond its length is ignored)."""
        if self.label_map is None:
            raise LmlabError("mapping predictions to tags needs the label map", field="label_map")
        tags = ["O"] * len(self.records[i]["tokens"])
        prev = None
        for pos, w in enumerate(self.word_ids[i]):
            if w is not None and w != prev:
                tags[w] = self.label_map.decode(token_label_ids[pos])
            prev = w
        return tags

    def predicted_tags(self, predictions: Iterable[Any]) -> list[list[str]]:
        """Word tags of every example from the (B, T) predicted ids of each `iter_eval()` batch, in order."""
        out: list[list[str]] = []
        for batch in predictions:
            rows = batch.tolist() if hasattr(batch, "tolist") else batch
            for row in rows:
                if len(out) == self.num_examples:
                    raise LmlabError(f"more predictions than the dataset's {self.num_examples} examples")
                out.append(self.word_tags(len(out), row))
        if len(out) != self.num_examples:  # a shorter list would silently pair tags with the wrong sentences
            raise LmlabError(f"predictions cover {len(out)} examples, the dataset has {self.num_examples}")
        return out
