"""`lmlab eval`: load a model once, run the requested tasks (ppl, mmlu, any task YAML), attach error bars."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.eval.bootstrap import bootstrap_se
from lmlab.eval.calibration import choice_probabilities, expected_calibration_error
from lmlab.eval.multiple_choice import choice_predictions, loglikelihoods
from lmlab.eval.perplexity import perplexity
from lmlab.eval.scoring import CORPUS_METRICS, score_generations
from lmlab.eval.tasks import GenerationTask, Task, TaskBase, load_task
from lmlab.utils.progress import progress_bar


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 over the checkpoint's weight and config files (a .gguf file, or a directory's files), sorted by name."""
    from lmlab.model.checkpoint import resolve

    p = resolve(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a bad line raises LmlabError naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmlabError(f"invalid JSON: {e.msg}", file=str(path), line=i) from e
    return out


def load_texts(data: str | os.PathLike, split: str = "test", limit: int | None = None) -> list[str]:
    """Texts of a .txt file (one text), a .jsonl file (its "text" fields) or a registered data set's split."""
    p = Path(data)
    if p.is_file() and p.suffix != ".jsonl":
        return [p.read_text(encoding="utf-8")]
    if not p.exists():
        from lmlab.data.registry import fetch

        p = fetch(str(data)) / f"{split}.jsonl"
    records = read_jsonl(p)
    if records and "text" not in records[0]:
        raise LmlabError("records have no 'text' field", file=str(p), field="text")
    texts = [r["text"] for r in records]
    return texts[:limit] if limit else texts


def check_tokenizer(model: torch.nn.Module, tokenizer: Any, where: str) -> None:
    """Refuse a missing tokenizer or one whose ids do not fit the model's embedding."""
    if tokenizer is None:
        raise LmlabError("the checkpoint has no tokenizer", file=where, hint="save one with lmlab.save_pretrained")
    vocab = model.cfg.vocab_size
    if tokenizer.vocab_size > vocab:
        raise LmlabError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}",
            file=where,
            field="vocab_size",
            hint="model and tokenizer come from different checkpoints",
        )


def run_ppl(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike,
    limit: int | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity and bits per byte on a text source, with a bootstrap SE over windows."""
    max_length = max_length or min(1024, model.cfg.max_seq_len)
    stride = stride or max_length // 2
    r = perplexity(model, tokenizer, load_texts(data, limit=limit), max_length, stride, progress=progress)
    windows = [(w["nll"], w["tokens"]) for w in r["windows"]]
    ratio = lambda ws: sum(a for a, _ in ws) / sum(b for _, b in ws)
    r["nll_per_token_se"] = bootstrap_se(windows, ratio, n_boot=200)
    r["data"] = str(data)
    return r


def run_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    docs: list[dict[str, Any]],
    fewshot_pool: list[dict[str, Any]] | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """acc and acc_norm with bootstrap SEs, and per-question records with every choice's log-likelihood."""
    requests, spans, records = [], [], []
    max_length = model.cfg.max_seq_len
    for doc in docs:
        ctx = task.context(doc, task.fewshot(doc, fewshot_pool or [], num_fewshot), tokenizer)
        choices = task.doc_choices(doc)
        conts = [task.target_delimiter + c for c in choices]
        # a chat-templated context already holds its special tokens
        ctx_ids = tokenizer.encode(ctx, add_special_tokens=not task.chat_template)
        if not ctx_ids:
            ctx_ids = [tokenizer.bos_token_id or 0]
        spans.append((len(requests), len(choices)))
        requests += [(ctx_ids, tokenizer.encode(c, add_special_tokens=False)) for c in conts]
        records.append({"target": task.doc_target(doc), "choices": choices, "continuations": conts, "doc": doc})
    scores = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    for rec, (start, n) in zip(records, spans):
        ll = [scores[start + j][0] for j in range(n)]
        pick = choice_predictions(ll, rec["continuations"])
        rec.update(loglikelihoods=ll, **pick)
        rec["acc"] = float(pick["pred"] == rec["target"])
        rec["acc_norm"] = float(pick["pred_norm"] == rec["target"])
        rec["confidence"] = max(choice_probabilities(ll))  # softmax over the choices, of the picked one
    acc = [r["acc"] for r in records]
    acc_norm = [r["acc_norm"] for r in records]
    out: dict[str, Any] = {
        "output_type": "multiple_choice",
        "n": len(records),
        "acc": sum(acc) / max(1, len(acc)),
        "acc_se": bootstrap_se(acc),
        "acc_norm": sum(acc_norm) / max(1, len(acc_norm)),
        "acc_norm_se": bootstrap_se(acc_norm),
    }
    conf = [(r["confidence"], r["acc"]) for r in records]
    ece = lambda xs: expected_calibration_error([c for c, _ in xs], [a for _, a in xs])
    out["ece"], out["ece_se"] = ece(conf), bootstrap_se(conf, ece, n_boot=200)
    if task.group_by:
        groups: dict[str, list[float]] = {}
        for r in records:
            groups.setdefault(str(r["doc"].get(task.group_by)), []).append(r["acc"])
        out["by_group"] = {g: {"n": len(v), "acc": sum(v) / len(v)} for g, v in sorted(groups.items())}
    out["records"] = records
    return out


def generation_prompts(
    tokenizer: Any,
    task: GenerationTask,
    docs: list[dict[str, Any]],
    fewshot_pool: list[dict[str, Any]] | None = None,
    num_fewshot: int = 0,
) -> list[str]:
    """The full prompt text of each record: description, few-shot examples, the question (chat-templated if asked)."""
    return [task.context(doc, task.fewshot(doc, fewshot_pool or [], num_fewshot), tokenizer) for doc in docs]


def run_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    task: GenerationTask,
    docs: list[dict[str, Any]],
    fewshot_pool: list[dict[str, Any]] | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Greedy generation until a stop string, batched; the task's metrics with bootstrap SEs and per-example records."""
    from lmlab.generate import generate

    prompts = generation_prompts(tokenizer, task, docs, fewshot_pool, num_fewshot)
    # room for the answer: a prompt longer than the context keeps its last tokens (lm-evaluation-harness does too)
    budget = max(1, model.cfg.max_seq_len - task.max_new_tokens)
    rows, truncated = [], []
    for text in prompts:
        ids = tokenizer.encode(text, add_special_tokens=not task.use_chat_template) or [tokenizer.bos_token_id or 0]
        rows.append(ids[-budget:])  # a chat-templated prompt already holds its special tokens
        truncated.append(len(ids) > budget)
    # longest first: similar lengths share a batch, so left padding stays small; results go back in record order
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    gens: list[Any] = [None] * len(rows)
    for b in progress_bar(range(0, len(order), batch_size), desc=task.name, disable=not progress, leave=False):
        batch = order[b : b + batch_size]
        batch_rows = [rows[i] for i in batch]
        greedy = generate(
            model, tokenizer, batch_rows, max_new_tokens=task.max_new_tokens, temperature=0.0, stop=task.until
        )
        for i, g in zip(batch, greedy):
            gens[i] = g
    predictions = [g.text.strip() for g in gens]  # the target delimiter's space is not part of the answer
    references = [task.doc_references(d) for d in docs]
    out = {"output_type": "generate_until", **score_generations(predictions, references, task.metrics, n_boot)}
    for rec, doc, prompt, ids, cut, g in zip(out["records"], docs, prompts, rows, truncated, gens):
        rec.update(input=task.doc_text(doc), prompt=prompt, prompt_tokens=len(ids), truncated=cut)
        rec.update(new_tokens=len(g.token_ids))
        rec.update(finish_reason=g.finish_reason, doc=doc)
    if task.group_by:
        out["by_group"] = group_scores(out["records"], [str(d.get(task.group_by)) for d in docs], task.metrics)
    return out


def group_scores(records: list[dict[str, Any]], groups: list[str], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Per group: n, sentence metrics averaged, corpus metrics recomputed on the group's examples."""
    by: dict[str, list[dict[str, Any]]] = {}
    for g, r in zip(groups, records):
        by.setdefault(g, []).append(r)
    out = {}
    for g, recs in sorted(by.items()):
        row: dict[str, Any] = {"n": len(recs)}
        for m in metrics:
            if m in CORPUS_METRICS:
                stats, formula = CORPUS_METRICS[m]
                summed = [sum(col) for col in zip(*(stats(r["prediction"], r["references"]) for r in recs))]
                row[m] = formula(summed)
            else:
                row[m] = sum(r[m] for r in recs) / len(recs)
        out[g] = row
    return out


def task_docs(task: TaskBase, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a task's data set split (a registered name or a JSONL path), subject-filtered, sampled."""
    p = Path(task.dataset)
    if p.suffix == ".jsonl":
        path = p if p.is_absolute() else Path(task.file).parent / p
    else:
        from lmlab.data.registry import fetch

        path = fetch(task.dataset) / f"{split}.jsonl"
    docs = task.select(read_jsonl(path))
    if limit and limit < len(docs):  # a fixed seeded sample in file order: spans subjects, same on every machine
        docs = [docs[i] for i in sorted(random.Random(0).sample(range(len(docs)), limit))]
    return docs


def evaluate(
    model_path: str | os.PathLike,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    data: str | os.PathLike | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    chat_template: bool | None = None,
) -> dict[str, Any]:
    """Run tasks on a checkpoint; with `out`, write results.json and report.md there.

    chat_template, when given, overrides every task's own setting (use_chat_template / chat_template): a base model
    has no template, an instruct model may be evaluated with or without one.
    """
    from lmlab.model.checkpoint import load_pretrained

    t0 = time.time()
    from lmlab.utils.device import default_device

    device = default_device(device)  # the one rule: CUDA when there, unless asked otherwise
    model, tokenizer = load_pretrained(model_path, device=device)
    model.eval()
    check_tokenizer(model, tokenizer, str(model_path))
    config = {
        "model": str(model_path),
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "data": str(data) if data else None,
        "max_length": max_length,
        "stride": stride,
        "batch_size": batch_size,
        "device": str(device),
        "chat_template": chat_template,
    }
    results: dict[str, Any] = {"config": config, "model_hash": model_hash(model_path), "tasks": {}}
    for name in tasks:
        if name == "ppl":
            if data is None:
                raise LmlabError("the ppl task needs --data FILE_OR_DATASET", field="data")
            results["tasks"]["ppl"] = run_ppl(model, tokenizer, data, limit, max_length, stride, progress)
            continue
        task = load_task(name)
        if chat_template is not None:
            setattr(task, "use_chat_template" if isinstance(task, GenerationTask) else "chat_template", chat_template)
        docs = task_docs(task, task.split, limit)
        pool = task_docs(task, task.fewshot_split) if num_fewshot else []
        run = run_generation if isinstance(task, GenerationTask) else run_multiple_choice
        results["tasks"][task.name] = run(model, tokenizer, task, docs, pool, num_fewshot, batch_size, progress)
    results["seconds"] = round(time.time() - t0, 1)
    if out is not None:
        from lmlab.eval.report import write_results

        write_results(results, out)
    return results
