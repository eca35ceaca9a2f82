"""Task definitions in YAML (lm-evaluation-harness style): templates for prompt, choices and target, few-shot."""

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
REQUIRED = ("name", "dataset", "prompt", "choices", "target")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class Task:
    """A multiple-choice task: how to turn a record into a prompt, its choices and the index of the right one."""

    name: str
    dataset: str
    prompt: str
    choices: list[str] | str
    target: str
    split: str = "test"
    fewshot_split: str = "train"
    group_by: str | None = None
    subjects: list[str] | str = "all"
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    chat_template: bool = False
    file: str = ""
    _compiled: dict[str, jinja2.Template] = field(default_factory=dict, repr=False)

    def _render(self, key: str, doc: dict[str, Any]) -> str:
        try:
            if key not in self._compiled:
                self._compiled[key] = _ENV.from_string(getattr(self, key))
            return self._compiled[key].render(**doc)
        except jinja2.TemplateError as e:
            raise LmlabError(f"template failed: {e}", file=self.file, field=key) from e

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
            if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
                raise LmlabError("the tokenizer has no chat template", file=self.file, field="chat_template")
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return text

    def select(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of the chosen subjects (all when subjects is 'all')."""
        if self.subjects == "all" or not self.group_by:
            return docs
        wanted = set(self.subjects)
        known = {d.get(self.group_by) for d in docs}
        if missing := wanted - known:
            raise LmlabError(f"unknown {sorted(missing)}", file=self.file, field="subjects", hint="see the data set")
        return [d for d in docs if d.get(self.group_by) in wanted]

    def fewshot(
        self, doc: dict[str, Any], pool: list[dict[str, Any]], k: int, seed: int = 1234
    ) -> list[dict[str, Any]]:
        """k examples from the pool (same group when group_by is set), fixed by the seed and the question."""
        if k <= 0:
            return []
        cands = [p for p in pool if not self.group_by or p.get(self.group_by) == doc.get(self.group_by)]
        cands = [p for p in cands if p != doc]
        rng = random.Random(f"{seed}:{doc.get(self.group_by, '')}")
        return rng.sample(cands, min(k, len(cands)))


def load_task(name_or_path: str | os.PathLike, **overrides: Any) -> Task:
    """A Task from a shipped name (mmlu) or a YAML file; a malformed file raises LmlabError naming the field."""
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
    known = {f for f in Task.__dataclass_fields__ if not f.startswith("_") and f != "file"}
    for key in spec:
        if key not in known:
            raise LmlabError("unknown field", file=str(path), field=key, hint=f"known: {', '.join(sorted(known))}")
    for key in REQUIRED:
        if key not in spec:
            raise LmlabError("missing required field", file=str(path), field=key)
    for key in ("name", "dataset", "prompt", "target", "split", "fewshot_split", "description"):
        if key in spec and not isinstance(spec[key], str):
            raise LmlabError("must be a string", file=str(path), field=key)
    if not isinstance(spec["choices"], (list, str)) or (isinstance(spec["choices"], list) and len(spec["choices"]) < 2):
        raise LmlabError("must be a list of at least two choices or a template", file=str(path), field="choices")
    if "chat_template" in spec and not isinstance(spec["chat_template"], bool):
        raise LmlabError("must be true or false", file=str(path), field="chat_template")
    if "subjects" in spec and spec["subjects"] != "all" and not isinstance(spec["subjects"], list):
        raise LmlabError("must be 'all' or a list", file=str(path), field="subjects")
    task = Task(**spec, file=str(path))
    for key in ("prompt", "description", "target") + (("choices",) if isinstance(task.choices, str) else ()):
        try:
            _ENV.from_string(getattr(task, key))
        except jinja2.TemplateSyntaxError as e:
            raise LmlabError(f"template syntax: {e.message}", file=str(path), field=key) from e
    return task
