"""Task definitions in YAML (lm-evaluation-harness style): multiple choice by log-likelihood, or generate_until."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from lmlab.errors import LmlabError

TASK_DIR = Path(__file__).parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "generate_until")
# sentence-level metrics are averaged over examples; bleu and chrf are corpus-level (statistics summed, as sacrebleu)
GENERATION_METRICS = ("exact_match", "token_f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass(kw_only=True)
class TaskBase:
    """What every task shares: its data, the record filter, the few-shot format and template rendering."""

    name: str
    dataset: str
    output_type: str = "multiple_choice"
    split: str = "test"
    fewshot_split: str = "train"
    group_by: str | None = None
    subjects: list[str] | str = "all"
    where: dict[str, Any] = field(default_factory=dict)  # keep records whose field equals the value (or is in a list)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    file: str = ""
    _compiled: dict[str, jinja2.Template] = field(default_factory=dict, repr=False)

    def _render(self, key: str, doc: dict[str, Any]) -> str:
        try:
            if key not in self._compiled:
                self._compiled[key] = _ENV.from_string(getattr(self, key))
            return self._compiled[key].render(**doc)
        except jinja2.TemplateError as e:
            raise LmlabError(f"template failed: {e}", file=self.file, field=key) from e

    def select(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records that pass `where` and belong to the chosen subjects (all when subjects is 'all')."""
        for key, value in self.where.items():
            if docs and all(key not in d for d in docs):
                raise LmlabError(f"no record has a field {key!r}", file=self.file, field="where")
            wanted = value if isinstance(value, list) else [value]
            docs = [d for d in docs if d.get(key) in wanted]
        if self.subjects == "all" or not self.group_by:
            return docs
        wanted = set(self.subjects)
        known = {d.get(self.group_by) for d in docs}
        if missing := wanted - known:
            raise LmlabError(f"unknown {sorted(missing)}", file=self.file, field="subjects", hint="see the data set")
        return [d for d in docs if d.get(self.group_by) in wanted]

    def same_example(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Whether a few-shot candidate is the evaluated example itself (it must not answer its own question)."""
        return a == b

    def fewshot(
        self, doc: dict[str, Any], pool: list[dict[str, Any]], k: int, seed: int = 1234
    ) -> list[dict[str, Any]]:
        """k examples from the pool (same group when group_by is set), fixed by the seed and the question."""
        if k <= 0:
            return []
        cands = [p for p in pool if not self.group_by or p.get(self.group_by) == doc.get(self.group_by)]
        cands = [p for p in cands if not self.same_example(p, doc)]
        rng = random.Random(f"{seed}:{doc.get(self.group_by, '')}")
        return rng.sample(cands, min(k, len(cands)))

    def _chat(self, tokenizer: Any, messages: list[dict[str, str]], key: str) -> str:
        # a tokenizer without a template would fail deep in rendering: say which task field asked for it
        if not hasattr(tokenizer, "apply_chat_template") or getattr(tokenizer, "chat_template", "") is None:
            raise LmlabError("the tokenizer has no chat template", file=self.file, field=key, hint=f"set {key}: false")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@dataclass(kw_only=True)
class Task(TaskBase):
    """A multiple-choice task: how to turn a record into a prompt, its choices and the index of the right one."""

    prompt: str
    choices: list[str] | str
    target: str
    chat_template: bool = False

    def doc_choices(self, doc: dict[str, Any]) -> list[str]:
        """The choice strings of one record."""
        if isinstance(self.choices, list):
            return [str(c) for c in self.choices]
        out = json.loads(self._render("choices", doc))
        if not isinstance(out, list):
            raise LmlabError("must render to a JSON list", file=self.file, field="choices")
        return [str(c) for c in out]

    def doc_target(self, doc: dict[str, Any]) -> int:
        """Index of the right choice of one record."""
        raw = self._render("target", doc).strip()
        choices = self.doc_choices(doc)
        if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(choices):
            return int(raw)
        if raw in choices:
            return choices.index(raw)
        raise LmlabError(f"rendered {raw!r}, neither an index nor one of the choices", file=self.file, field="target")

    def context(self, doc: dict[str, Any], shots: list[dict[str, Any]], tokenizer: Any = None) -> str:
        """The text before a choice: description, few-shot examples with answers, the question."""
        parts = [
            self._render("prompt", s) + self.target_delimiter + self.doc_choices(s)[self.doc_target(s)] for s in shots
        ]
        parts.append(self._render("prompt", doc))
        text = self._render("description", doc) + self.fewshot_delimiter.join(parts)
        if self.chat_template:
            return self._chat(tokenizer, [{"role": "user", "content": text}], "chat_template")
        return text


@dataclass(kw_only=True)
class GenerationTask(TaskBase):
    """A generate_until task: prompt → greedy continuation up to a stop string, scored against reference texts."""

    doc_to_text: str
    doc_to_target: str  # renders one reference, or a JSON list of references
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 64
    use_chat_template: bool = False
    metrics: list[str] = field(default_factory=lambda: list(GENERATION_METRICS))
    merge_same_prompt: bool = False  # records with the same prompt become one example with all their references

    def doc_text(self, doc: dict[str, Any]) -> str:
        """The prompt of one record (without few-shot examples or chat template)."""
        return self._render("doc_to_text", doc)

    def doc_references(self, doc: dict[str, Any]) -> list[str]:
        """The reference texts of one record: doc_to_target rendered, a JSON list giving several."""
        if "_references" in doc:
            return list(doc["_references"])
        raw = self._render("doc_to_target", doc)
        refs: Any = [raw]
        if raw.strip().startswith("["):
            try:
                refs = json.loads(raw)
            except json.JSONDecodeError:
                refs = [raw]  # a reference that merely starts with a bracket
            if not isinstance(refs, list):
                refs = [raw]
        if not refs:
            raise LmlabError("rendered an empty list of references", file=self.file, field="doc_to_target")
        return [str(r) for r in refs]

    def select(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Filtered records; with merge_same_prompt, one record per distinct prompt holding every reference."""
        docs = super().select(docs)
        if not self.merge_same_prompt:
            return docs
        merged: dict[str, dict[str, Any]] = {}
        for d in docs:
            key = self.doc_text(d)
            if key not in merged:
                merged[key] = {**d, "_references": self.doc_references(d)}
            else:
                refs = merged[key]["_references"]
                refs += [r for r in self.doc_references(d) if r not in refs]
        return list(merged.values())

    def same_example(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Same prompt text: a duplicate question in the few-shot split would hand the model its answer."""
        return a == b or self.doc_text(a) == self.doc_text(b)

    def context(self, doc: dict[str, Any], shots: list[dict[str, Any]], tokenizer: Any = None) -> str:
        """The prompt text: description and few-shot examples (as earlier chat turns with use_chat_template)."""
        description = self._render("description", doc)
        if self.use_chat_template:
            messages = [{"role": "system", "content": description}] if description else []
            for s in shots:
                messages += [
                    {"role": "user", "content": self.doc_text(s)},
                    {"role": "assistant", "content": self.doc_references(s)[0]},
                ]
            messages.append({"role": "user", "content": self.doc_text(doc)})
            return self._chat(tokenizer, messages, "use_chat_template")
        parts = [self.doc_text(s) + self.target_delimiter + self.doc_references(s)[0] for s in shots]
        return description + self.fewshot_delimiter.join([*parts, self.doc_text(doc)])


# field -> (accepted types, what to say when the type is wrong); per output type, then the required fields
_COMMON: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "must be a string"),
    "dataset": ((str,), "must be a string"),
    "output_type": ((str,), "must be a string"),
    "split": ((str,), "must be a string"),
    "fewshot_split": ((str,), "must be a string"),
    "group_by": ((str, type(None)), "must be a field name"),
    "subjects": ((str, list), "must be 'all' or a list"),
    "where": ((dict,), "must be a mapping of field: value (or a list of values)"),
    "description": ((str,), "must be a string"),
    "target_delimiter": ((str,), "must be a string"),
    "fewshot_delimiter": ((str,), "must be a string"),
}
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "multiple_choice": _COMMON
    | {
        "prompt": ((str,), "must be a string"),
        "choices": ((list, str), "must be a list of at least two choices or a template"),
        "target": ((str,), "must be a string"),
        "chat_template": ((bool,), "must be true or false"),
    },
    "generate_until": _COMMON
    | {
        "doc_to_text": ((str,), "must be a string (a template)"),
        "doc_to_target": ((str,), "must be a string (a template rendering one reference or a JSON list)"),
        "until": ((list, str), "must be a stop string or a list of them"),
        "max_new_tokens": ((int,), "must be a positive integer"),
        "use_chat_template": ((bool,), "must be true or false"),
        "metrics": ((list,), f"must be a list from {', '.join(GENERATION_METRICS)}"),
        "merge_same_prompt": ((bool,), "must be true or false"),
    },
}
_REQUIRED = {
    "multiple_choice": ("name", "dataset", "prompt", "choices", "target"),
    "generate_until": ("name", "dataset", "doc_to_text", "doc_to_target"),
}
_TEMPLATES = {
    "multiple_choice": ("prompt", "description", "target"),
    "generate_until": ("doc_to_text", "doc_to_target", "description"),
}


def _check_fields(spec: dict[str, Any], kind: str, path: str) -> None:
    """Raise LmlabError naming the file and the first unknown, missing or mistyped field."""
    fields = _FIELDS[kind]
    for key in spec:
        if key not in fields:
            hint = f"known for output_type {kind}: {', '.join(sorted(fields))}"
            raise LmlabError("unknown field", file=path, field=key, hint=hint)
    for key in _REQUIRED[kind]:
        if key not in spec:
            raise LmlabError(f"missing required field (output_type {kind})", file=path, field=key)
    for key, value in spec.items():
        types, why = fields[key]
        bad_bool = isinstance(value, bool) and bool not in types  # YAML true is an int to Python
        if bad_bool or not isinstance(value, types):
            raise LmlabError(why, file=path, field=key)
    if spec.get("subjects", "all") != "all" and not isinstance(spec["subjects"], list):
        raise LmlabError("must be 'all' or a list", file=path, field="subjects")
    if kind == "multiple_choice":
        if isinstance(spec["choices"], list) and len(spec["choices"]) < 2:
            raise LmlabError(fields["choices"][1], file=path, field="choices")
        return
    until = spec.get("until", [])
    if isinstance(until, list) and not all(isinstance(u, str) and u for u in until):
        raise LmlabError("stop strings must be non-empty strings", file=path, field="until")
    if spec.get("max_new_tokens", 1) < 1:
        raise LmlabError(fields["max_new_tokens"][1], file=path, field="max_new_tokens")
    metrics = spec.get("metrics", list(GENERATION_METRICS))
    if not metrics:
        raise LmlabError("needs at least one metric", file=path, field="metrics")
    for m in metrics:
        if m not in GENERATION_METRICS:
            raise LmlabError(f"unknown metric {m!r}", file=path, field="metrics", hint=f"known: {fields['metrics'][1]}")
    if len(set(metrics)) != len(metrics):
        raise LmlabError("a metric is listed twice", file=path, field="metrics")


def load_task(name_or_path: str | os.PathLike, **overrides: Any) -> Task | GenerationTask:
    """A task from a shipped name (mmlu, ...) or a YAML file; a malformed file raises LmlabError naming the field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            shipped = ", ".join(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))
            raise LmlabError(f"unknown task {str(name_or_path)!r}", hint=f"shipped: {shipped}, or a .yaml path")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise LmlabError("no such task file", file=str(path)) from e
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise LmlabError(f"invalid YAML: {e}", file=str(path), line=line + 1 if line is not None else None) from e
    if not isinstance(spec, dict):
        raise LmlabError("a task file must be a mapping", file=str(path))
    spec.update(overrides)
    kind = spec.get("output_type", "multiple_choice")
    if kind not in OUTPUT_TYPES:
        raise LmlabError(
            f"unknown output_type {kind!r}", file=str(path), field="output_type", hint=" or ".join(OUTPUT_TYPES)
        )
    _check_fields(spec, kind, str(path))
    if kind == "generate_until" and isinstance(spec.get("until"), str):
        spec["until"] = [spec["until"]]
    task: Task | GenerationTask = (Task if kind == "multiple_choice" else GenerationTask)(**spec, file=str(path))
    templates = _TEMPLATES[kind] + (("choices",) if isinstance(getattr(task, "choices", None), str) else ())
    for key in templates:
        try:
            _ENV.from_string(getattr(task, key))
        except jinja2.TemplateSyntaxError as e:
            raise LmlabError(f"template syntax: {e.message}", file=str(path), field=key) from e
    return task
