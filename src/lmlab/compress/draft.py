"""A draft model for speculative decoding: cheap per token, trained on what the target will say.

Speculative decoding pays when the draft costs little next to the target and agrees with it often.
Two things decide both on a small model like SmolLM2-135M:

- **The head.** A 49,152 x 576 output layer is a fifth of the model's weights; a 4-layer draft with it
  costs a sixth of the target per token. A draft needs only the tokens the target actually writes:
  `reduce_head` keeps the most frequent `n` of them (FR-Spec, Zhao et al. 2025; EAGLE-3 keeps 32k of
  128k), and the model's logits for every other token are -inf, so the draft never proposes them and
  speculative decoding stays exact.
- **The data.** The draft is judged on the target's own greedy answers, so it learns from them
  (sequence-level distillation, Kim & Rush 2016): `teacher_answers` writes the teacher's greedy answers
  to chat prompts as chat records, which then go through distillation like any other corpus. Where
  prompts of the kind users send are scarce, `teacher_prompts` has the teacher write them: sampled
  from its chat template cut where the user's turn begins, an aligned model writes the requests it
  was aligned on (Magpie, Xu et al. 2024).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import generate
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.utils.atomic import write_json, write_text
from lmlab.utils.progress import progress_bar


def frequent_tokens(windows: torch.Tensor, n: int, always: Iterable[int] = ()) -> list[int]:
    """The n most frequent token ids in `windows` (ties: lower id first), `always` included, sorted."""
    keep = {int(t) for t in always}
    if n < len(keep) or n < 1:
        raise LmlabError(f"head_vocab {n} is smaller than the {len(keep)} special tokens it must keep",
                         field="distill.student.head_vocab")  # fmt: skip
    counts = Counter(windows.flatten().tolist())
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= n:
            break
        keep.add(token)
    return sorted(keep)


def reduce_head(model: Transformer, token_ids: list[int]) -> Transformer:
    """`model` with an LM head over `token_ids` only: its rows copied from the full head (untied from the
    embedding, which still reads every token). The model is changed in place and returned."""
    if model.lm_head is None:
        raise LmlabError("a reduced head needs a model with an LM head", field="head_tokens")
    if model.cfg.head_tokens is not None:
        raise LmlabError(f"the model's head is already reduced (to {len(model.cfg.head_tokens)} tokens)",
                         field="distill.student.head_vocab", hint="drop head_vocab for this student")  # fmt: skip
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.lm_head.weight.device)
    cfg = dataclasses.replace(model.cfg, tie_embeddings=False, head_tokens=list(map(int, token_ids)))
    rows = model.lm_head.weight.detach()[ids].clone()  # (len(ids), d)
    model.lm_head = nn.Linear(cfg.d_model, len(token_ids), bias=False, device=rows.device, dtype=rows.dtype)
    model.lm_head.weight = nn.Parameter(rows)
    model.cfg = cfg
    model.init_buffers(rows.device)
    return model


def user_turn(record: dict[str, Any]) -> str | None:
    """A record's prompt as a user turn: a chat's first user message, a question with its lettered
    choices (MMLU), or a plain text."""
    if "messages" in record:
        first = record["messages"][0] if record["messages"] else {}
        return first.get("content") if first.get("role") == "user" else None
    if "question" in record:
        choices = "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(record.get("choices") or []))
        return record["question"] + choices
    return record.get("text")


def prompts_from(files: list[Path], max_prompts: int | None = None) -> list[str]:
    """Distinct user turns from jsonl files, in file order, at most max_prompts."""
    seen: dict[str, None] = {}
    for file in files:
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = user_turn(json.loads(line))
            except (json.JSONDecodeError, AttributeError, TypeError) as e:
                raise LmlabError(f"not a JSON record ({e})", file=str(file), line=i) from None
            if text and text.strip():
                seen.setdefault(text.strip(), None)
            if max_prompts and len(seen) >= max_prompts:
                return list(seen)
    return list(seen)


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of a model's parameter names, shapes, dtypes and values (~1 s for SmolLM2): which
    teacher a cache was made with."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _template_digest(tokenizer: Tokenizer) -> str:
    """A digest of the chat template as it renders a user turn."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=True)
    return hashlib.blake2b(json.dumps(list(ids)).encode(), digest_size=8).hexdigest()


def user_prefix(tokenizer: Tokenizer) -> list[int]:
    """The chat template's tokens up to where a user's message begins (with its default system turn)."""
    marker = "\ue000lmlab\ue000"  # a private-use string no template or tokenizer rewrites
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False,
                                         tokenize=False)  # fmt: skip
    if marker not in text:
        raise LmlabError("the chat template does not render the user's message", field="chat_template")
    return list(tokenizer.encode(text[: text.index(marker)], add_special_tokens=False))


@torch.inference_mode()
def teacher_prompts(
    teacher: Transformer,
    tokenizer: Tokenizer,
    n: int,
    path: Path,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 64,
    batch: int = 32,
    seed: int = 0,
    progress: bool = True,
    exclude: Iterable[str] = (),
    digest: str | None = None,
) -> list[str]:
    """`n` distinct user requests written by the teacher itself (Magpie): the chat template up to the
    start of a user turn, sampled on. Only turns the teacher ends itself within `max_new_tokens` are
    kept (a cut-off request is half a prompt), with no special token before its end (no turn that
    wanders into the assistant's), stripped and at least 8 characters long; and none in `exclude`
    (prompts the caller has already). `digest`: the teacher's `weights_digest`, if the caller has it.

    Round r samples `batch` rows with seed `seed + r`, so the list is a function of the teacher and these
    settings; `path` (jsonl, one {"text": ...} per prompt, sidecar `path`.json) keeps what was made, and
    a larger `n` or an interrupted run continues from the rounds already done. 64 tokens x 32 rows take
    ~12 s on 2 cores, ~2 kept prompts a second on SmolLM2-135M-Instruct."""
    if n < 0 or batch < 1:
        raise LmlabError(f"n = {n} and batch = {batch}: want n >= 0 and batch >= 1", field="self_prompts")
    meta = {"teacher": digest or weights_digest(teacher), "template": _template_digest(tokenizer), "temperature": temperature,
            "top_p": top_p, "max_new_tokens": max_new_tokens, "batch": batch, "seed": seed,
            "keep": "ended, no special token, >= 8 characters"}  # fmt: skip
    sidecar = path.with_suffix(".json")
    found: dict[str, None] = {}
    rounds = 0
    try:
        old = json.loads(sidecar.read_text(encoding="utf-8")) if path.exists() and sidecar.exists() else {}
        if all(old.get(k) == v for k, v in meta.items()):
            lines = path.read_text(encoding="utf-8").splitlines()
            found = dict.fromkeys(json.loads(line)["text"] for line in lines if line.strip())
            rounds = int(old["rounds"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        found, rounds = {}, 0  # not a file this function wrote: start again
    prefix = user_prefix(tokenizer)
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    excluded = set(exclude)

    def kept() -> list[str]:
        return [t for t in found if t not in excluded]

    def save() -> None:
        sidecar.unlink(missing_ok=True)  # (killed between the two writes: no sidecar vouches for the file)
        write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in found))
        write_json(sidecar, {**meta, "rounds": rounds})

    have = len(kept())
    if have >= n:
        return kept()[:n]
    bar = progress_bar(total=n, initial=have, desc="teacher prompts", unit="prompt", disable=not progress)
    saved, began, ended = time.monotonic(), 0, 0
    try:
        while have < n:
            config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed + rounds)  # fmt: skip
            for g in generate(teacher, tokenizer, [prefix] * batch, config):
                text = g.text.strip()
                if g.finish_reason != "stop":
                    continue
                ended += 1
                if len(text) >= 8 and not special.intersection(g.token_ids[:-1]):
                    found.setdefault(text, None)
            rounds, began = rounds + 1, began + batch
            now = len(kept())
            bar.update(min(now, n) - have)
            have = now
            if began >= 8 * batch and 100 * ended < began:  # under 1% ended: a model that never ends a turn
                raise LmlabError(f"the teacher ended {ended} of the {began} user turns it began within "
                                 f"{max_new_tokens} tokens", hint="is it a chat model with this chat template?")  # fmt: skip
            if time.monotonic() - saved > 60:
                save()
                saved = time.monotonic()
    finally:
        bar.close()
    save()
    return kept()[:n]


def _stored_answers(path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """{prompt: answer} from an earlier `teacher_answers` file made by the same teacher at the same length."""
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return {}
    try:
        old = json.loads(sidecar.read_text(encoding="utf-8"))
        if any(old.get(k) != meta[k] for k in ("max_new_tokens", "teacher", "template")):
            return {}
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {r["messages"][0]["content"]: r["messages"][1]["content"] for r in recs}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return {}  # not a file this function wrote: make it again


@torch.inference_mode()
def teacher_answers(
    teacher: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    path: Path,
    max_new_tokens: int = 128,
    batch: int = 32,
    progress: bool = True,
    digest: str | None = None,
) -> Path:
    """The teacher's greedy answer to each prompt (chat template), written to `path` as chat records
    {"messages": [user, assistant]}, one per prompt in order.

    Answers already in `path` are reused when its sidecar (`path`.json) says the same teacher (a digest
    of its weights) made them at the same length with the same chat template, so a longer prompt list
    generates only the new prompts' answers (at 128 tokens, ~1,700 prompts take 20 minutes on 2
    cores). The file is saved every minute: an interrupted run resumes where it stopped. `digest`: the
    teacher's `weights_digest`, if the caller has it."""
    # what the answers depend on: the teacher's weights, the length, the chat template (as it renders a
    # turn); and which prompts the file holds
    meta = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "teacher": digest or weights_digest(teacher),
            "template": _template_digest(tokenizer),
            "prompt_list": hashlib.blake2b("\0".join(prompts).encode(), digest_size=8).hexdigest(),
            "first": prompts[:1], "last": prompts[-1:]}  # fmt: skip
    sidecar = path.with_suffix(".json")
    if sidecar.exists() and path.exists() and json.loads(sidecar.read_text(encoding="utf-8")) == meta:
        return path  # exactly this file, complete (a partial save's sidecar says "partial")
    answers = _stored_answers(path, meta)
    todo = [p for p in dict.fromkeys(prompts) if p not in answers]
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True) for p in todo]  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    bar = progress_bar(total=len(rows), desc="teacher answers", unit="prompt", disable=not progress)

    def save(partial: bool) -> None:  # the answers so far, in prompt order: an interrupted run resumes from them
        lines = [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answers[p]}]},
                            ensure_ascii=False) for p in prompts if p in answers]  # fmt: skip
        sidecar.unlink(missing_ok=True)  # (killed between the two writes: no sidecar vouches for the file)
        write_text(path, "\n".join(lines) + "\n")
        write_json(sidecar, {**meta, "partial": True} if partial else meta)

    saved = time.monotonic()
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        for i, g in zip(idx, generate(teacher, tokenizer, [rows[i] for i in idx], config)):
            answers[todo[i]] = tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
        bar.update(len(idx))
        if time.monotonic() - saved > 60:
            save(partial=True)
            saved = time.monotonic()
    bar.close()
    save(partial=False)
    return path
