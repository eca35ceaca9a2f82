"""Knowledge distillation (Hinton et al. 2015): a small student learns the teacher's softened distribution.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next token)

T > 1 softens both distributions so the student sees which wrong tokens the teacher finds plausible;
T^2 keeps the KL's gradient on the scale of the CE's as T changes. Forward KL (teacher first) makes the
student cover everything the teacher allows; reverse KL (student first, as in MiniLLM) makes it pick
the teacher's main modes. Teacher logits come from the teacher on the fly, or from a cache of its top-k
logits per token written once to disk (the student then matches the teacher on those k tokens).

The student: the teacher's first N layers with its embeddings, final norm and head (a ready draft for
speculative decoding), a smaller preset, or any checkpoint (a pruned copy). One Trainer runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmlab.compress.draft import (
    frequent_tokens,
    prompts_from,
    reduce_head,
    teacher_answers,
    teacher_prompts,
    weights_digest,
)
from lmlab.compress.eagle import EagleLoss, eagle_draft
from lmlab.compress.prune import token_windows
from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import stop_token_ids
from lmlab.model.checkpoint import load_pretrained
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.train.config import Recipe, coerce, section_config
from lmlab.train.trainer import Trainer
from lmlab.utils.atomic import atomic_path, write_json
from lmlab.utils.device import default_device
from lmlab.utils.progress import progress_bar

KL_KINDS = ("forward", "reverse")
EAGLE_KEYS = ("eagle", "init_from", "unroll", "noise", "cls_weight")


# -- the loss -----------------------------------------------------------------------------------------
def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 kind: str = "forward") -> torch.Tensor:  # fmt: skip
    """KL between the temperature-softened distributions at each position (..., V) -> (...)."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if kind == "forward":  # KL(teacher || student) = sum p_t (log p_t - log p_s)
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse":  # KL(student || teacher)
        return (s.exp() * (s - t)).sum(-1)
    raise LmlabError(f"kl {kind!r} is not one of {', '.join(KL_KINDS)}", field="distill.kl")


def topk_kl_per_token(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Forward KL restricted to the teacher's top-k tokens: sum_k p_k (log p_k - log q_k), with p the
    teacher's softened distribution renormalized over its k tokens and q the student's full softmax."""
    s = F.log_softmax(student_logits.float() / temperature, -1).gather(-1, top_indices.long())  # (..., k)
    t = F.log_softmax(top_values.float() / temperature, -1)
    # top-k entries set to -inf (tokens a reduced student head lacks) add nothing: 0 * log 0 = 0. They
    # are zeroed before the product too: where every entry is -inf, t is NaN, and a NaN in the branch
    # torch.where discards would still reach the student's gradient (0 * NaN)
    ok = torch.isfinite(t)
    t = torch.where(ok, t, 0.0)
    return torch.where(ok, t.exp() * (t - s), 0.0).sum(-1)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    kind: str = "forward",
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
    ce_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * T^2 * mean KL + (1 - alpha) * mean CE over positions whose target is not -100 (all
    positions without targets). Pass teacher logits (B, T, V), or top=(values, indices) (B, T, k).
    ce_targets: the cross-entropy's own targets where they differ (a reduced head's positions)."""
    kl = (
        topk_kl_per_token(student_logits, *top, temperature)
        if top is not None
        else kl_per_token(student_logits, teacher_logits, temperature, kind)
    )
    if targets is None:
        loss = alpha * temperature**2 * kl.mean()
    else:  # masked means, not boolean indexing: no host sync and no copy of the (B, T, V) logits
        keep = (targets != -100).to(kl.dtype)
        loss = alpha * temperature**2 * (kl * keep).sum() / keep.sum()
    if alpha < 1 and targets is not None:
        ce_targets = targets if ce_targets is None else ce_targets
        # summed and divided by the count (at least 1): a batch whose targets are all outside a reduced
        # head counts none, where a mean would give NaN
        ce = F.cross_entropy(student_logits.flatten(0, -2).float(), ce_targets.flatten(), ignore_index=-100,
                             reduction="sum") / (ce_targets != -100).sum().clamp(min=1)  # fmt: skip
        loss = loss + (1 - alpha) * ce
    return loss


# -- the recipe ---------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    """The `distill:` section of a recipe."""

    teacher: str = "smollm2-135m-instruct"
    # layers: N | preset: NAME | init_from: PATH | eagle: true (with init_from, unroll, noise, cls_weight);
    # head_vocab: N
    student: dict[str, Any] = field(default_factory=lambda: {"layers": 4})
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KL term; 1 - alpha goes to the next-token cross-entropy
    kl: str = "forward"
    teacher_logits: str = "online"  # online: run the teacher each step; cache: top-k logits on disk
    top_k: int = 64
    freeze_embeddings: bool = True  # a student sharing the teacher's vocabulary keeps its embeddings (and tied head)
    # sequence-level distillation: the teacher's greedy answers to these prompts join the training data
    # ({datasets: [...], max_prompts: N, self_prompts: S, max_new_tokens: M, batch: B}; see compress/draft.py):
    # S more prompts the teacher writes itself follow the data sets' N
    teacher_answers: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature > 0, "> 0"),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("kl", self.kl in KL_KINDS, f"one of {', '.join(KL_KINDS)}"),
            ("teacher_logits", self.teacher_logits in ("online", "cache"), "online or cache"),
            ("top_k", self.top_k >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise LmlabError(f"{getattr(self, name)!r} must be {want}", field=f"distill.{name}")
        if self.teacher_answers is not None:
            known = {"datasets", "max_prompts", "self_prompts", "max_new_tokens", "batch"}
            if unknown := sorted(set(self.teacher_answers) - known):
                raise LmlabError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})",
                                 field="distill.teacher_answers")  # fmt: skip
            if not self.teacher_answers.get("datasets"):
                raise LmlabError("name the prompts' data sets", field="distill.teacher_answers.datasets")
            for key, least in (("max_prompts", 1), ("self_prompts", 0), ("max_new_tokens", 1), ("batch", 1)):
                v = self.teacher_answers.get(key)
                if v is not None and (type(v) is not int or v < least):
                    raise LmlabError(f"{v!r} must be a whole number >= {least}", field=f"distill.teacher_answers.{key}")
        if self.teacher_logits == "cache" and self.kl == "reverse":
            raise LmlabError("reverse KL needs the teacher's full distribution", field="distill.kl",
                             hint="use teacher_logits: online")  # fmt: skip


def distill_config(recipe: Recipe) -> DistillConfig:
    """The recipe's `distill:` section, validated (unknown keys named)."""
    return section_config(DistillConfig, recipe.distill, "distill", recipe.source)


def first_layers(teacher: Transformer, n_layers: int) -> Transformer:
    """An independent copy of the teacher's first n layers with its embeddings, final norm and head."""
    if not 1 <= n_layers <= teacher.cfg.n_layer:
        raise LmlabError(f"layers {n_layers} is outside 1..{teacher.cfg.n_layer}", field="distill.student.layers")
    cfg = dataclasses.replace(teacher.cfg, n_layer=n_layers, **_first(teacher.cfg, n_layers))
    with torch.device("meta"):
        student = Transformer(cfg)
    for name, child in teacher.named_children():
        setattr(student, name, torch.nn.ModuleList(list(child)[:n_layers]) if name == "layers" else child)
    student = copy.deepcopy(student)  # its own weights (the tie between embedding and head survives the copy)
    student.init_buffers(next(teacher.parameters()).device)
    return student.requires_grad_(True)  # a frozen teacher's flags must not freeze the student


def _first(cfg: ModelConfig, n: int) -> dict[str, Any]:
    return {k: v[:n] for k in ("layer_n_head", "layer_n_kv_head", "layer_d_ff") if (v := getattr(cfg, k)) is not None}


def build_student(spec: dict[str, Any], teacher: Transformer, source: str | None = None) -> Transformer:
    """The student a recipe names; its vocabulary must be the teacher's. (`head_vocab: N`, a reduced
    head, is applied by `distill` once the training data is known.)"""
    spec = {k: v for k, v in spec.items() if k != "head_vocab"}
    if spec.get("eagle"):
        if unknown := sorted(set(spec) - set(EAGLE_KEYS)):
            raise LmlabError(f"unknown key {unknown[0]!r} for an EAGLE draft (known: {', '.join(EAGLE_KEYS)})",
                             file=source, field="distill.student")  # fmt: skip
        eagle_options(spec, source)  # bad settings named now, not after the teacher's answers
        if "init_from" not in spec:
            return eagle_draft(teacher)
        draft = load_pretrained(spec["init_from"])[0]  # go on training an EAGLE draft
        if not draft.cfg.eagle or draft.cfg.d_model != teacher.cfg.d_model:
            raise LmlabError(f"{spec['init_from']} is not an EAGLE draft of width {teacher.cfg.d_model}",
                             file=source, field="distill.student.init_from")  # fmt: skip
        check_vocab(teacher, draft, "distill.student")
        return draft.requires_grad_(True)
    if "layers" in spec:
        student = first_layers(teacher, int(spec["layers"]))
    elif "init_from" in spec:
        student = load_pretrained(spec["init_from"])[0]
    elif "preset" in spec:
        rest = {k: v for k, v in spec.items() if k != "preset"}
        t = teacher.cfg
        ids = dict(vocab_size=t.vocab_size, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                   pad_token_id=t.pad_token_id)  # fmt: skip
        student = Transformer(
            ModelConfig.from_preset(spec["preset"], **{**ids, **coerce(ModelConfig, rest, "student")})
        )
    else:
        raise LmlabError("name the student: layers: N, preset: NAME or init_from: PATH", file=source,
                         field="distill.student")  # fmt: skip
    check_vocab(teacher, student, "distill.student")
    return student


def eagle_options(spec: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """An EAGLE student's loss settings (cls_weight >= 0, unroll >= 1, noise >= 0), each checked."""
    opts = {"cls_weight": 0.1, "unroll": 1, "noise": 0.0}
    for key, default in list(opts.items()):
        value = spec.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value >= 1 and float(value).is_integer() if key == "unroll" else ok and value >= 0)
        if not ok:
            want = "an integer >= 1" if key == "unroll" else "a number >= 0"
            raise LmlabError(f"{value!r} must be {want}", file=source, field=f"distill.student.{key}")
        opts[key] = type(default)(value)
    return opts


def check_vocab(target: Transformer, other: Transformer, what: str) -> None:
    """Teacher and student (or target and draft) must share one vocabulary, token for token."""
    if other.cfg.vocab_size != target.cfg.vocab_size:
        raise LmlabError(f"vocabulary mismatch: {other.cfg.vocab_size} tokens vs the teacher's "
                         f"{target.cfg.vocab_size}", field=what, hint="use a model with the same tokenizer")  # fmt: skip


# -- data -------------------------------------------------------------------------------------------
class Windows:
    """Batches (x, y, index) over fixed token windows, in a seeded order each epoch."""

    def __init__(self, windows: torch.Tensor, rows: int, shuffle: bool = True, seed: int = 0) -> None:
        self.windows, self.rows, self.shuffle, self.seed = windows, rows, shuffle, seed
        self.steps_per_epoch = max(len(windows) // rows, 1)

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.windows), generator=g) if self.shuffle else torch.arange(len(self.windows))
        idx = order[i * self.rows : (i + 1) * self.rows]
        w = self.windows[idx]
        return w[:, :-1], w[:, 1:], idx


@torch.no_grad()
def teacher_pass(teacher: Transformer, windows: torch.Tensor, path: Path,
                 fn: Callable[[Transformer, torch.Tensor], dict[str, torch.Tensor]], desc: str, batch: int = 4,
                 progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """`fn(teacher, rows)` -> {name: tensor (B, ...)} over every window's input tokens, batch by batch,
    written once to a safetensors file with the windows.

    A later run with the same teacher reuses the saved results of every window it has (a grown corpus
    computes only its new windows): the teacher's results on the first saved window are recomputed and
    must match (the float ones within float16 rounding, every shape exactly), else all is made again."""
    teacher.eval()
    device = next(teacher.parameters()).device
    known: dict[bytes, int] = {}  # a saved window's tokens -> its row in the file
    if path.exists():
        with safe_open(str(path), "pt") as f:  # read lazily: the file can be gigabytes
            keys = set(f.keys())
            old = f.get_tensor("windows") if "windows" in keys else None
            if old is not None and old.dim() == 2 and len(old) and old.shape[1] == windows.shape[1]:
                first = fn(teacher, old[:1, :-1].to(device))  # the same teacher? it must reproduce the first entry
                saved = {name: f.get_slice(name)[0:1] for name in first if name in keys}
                same = all(
                    name in saved and saved[name].shape == t.shape and saved[name].dtype == t.dtype
                    and (not t.is_floating_point() or torch.allclose(t.float(), saved[name].float(), 1e-2, 1e-2))
                    for name, t in first.items()
                )  # fmt: skip
                if same and torch.equal(old, windows):
                    return load_file(str(path))
                if same:
                    known = {row.numpy().tobytes(): i for i, row in enumerate(old.long())}
    where = [known.get(row.numpy().tobytes(), -1) for row in windows.long()]  # a saved row's index, or -1
    todo = [i for i, j in enumerate(where) if j < 0]
    # each result goes straight into its place in the output (no list of parts joined at the end),
    # and saved rows are copied a slice of the file at a time: the peak is the output plus a slice
    out: dict[str, torch.Tensor] = {}
    for start in progress_bar(range(0, len(todo), batch), desc=desc, disable=not progress):
        idx = todo[start : start + batch]
        for name, t in fn(teacher, windows[idx, :-1].to(device)).items():
            if name not in out:
                out[name] = t.new_empty((len(windows), *t.shape[1:]))
            out[name][idx] = t
    if known:
        by_source = sorted((j, i) for i, j in enumerate(where) if j >= 0)  # (row in the file, row here)
        groups: list[list[tuple[int, int]]] = []  # runs spanning at most 256 rows of the file
        for pair in by_source:
            if not groups or pair[0] - groups[-1][0][0] >= 256:
                groups.append([])
            groups[-1].append(pair)
        with safe_open(str(path), "pt") as f:
            for name in sorted(set(f.keys()) - {"windows"}):
                sl = f.get_slice(name)
                for pairs in groups:
                    lo = pairs[0][0]
                    part = sl[lo : pairs[-1][0] + 1]  # the saved rows this run needs (and those between)
                    if name not in out:
                        out[name] = part.new_empty((len(windows), *part.shape[1:]))
                    out[name][[i for _, i in pairs]] = part[[j - lo for j, _ in pairs]]
    out["windows"] = windows.contiguous()
    with atomic_path(path) as tmp:
        save_file(out, str(tmp))
    return out


def cache_teacher_topk(teacher: Transformer, windows: torch.Tensor, k: int, path: Path, batch: int = 4,
                       progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The teacher's top-k logits at every position of every window (values float16, indices int32),
    written once (`teacher_pass`)."""

    def topk(model: Transformer, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        top = model(rows).float().topk(k, dim=-1)
        return {"values": top.values.half().cpu(), "indices": top.indices.int().cpu()}

    return teacher_pass(teacher, windows, path, topk, "teacher top-k", batch, progress)


def cache_features(teacher: Transformer, windows: torch.Tensor, path: Path, batch: int = 4,
                   progress: bool = True) -> torch.Tensor:  # fmt: skip
    """The teacher's final hidden states at every input position of every window (N, T - 1, d) as
    float16 (an EAGLE draft's training input), written once (`teacher_pass`)."""

    def states(model: Transformer, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": model.hidden_states(rows).half().cpu()}

    return teacher_pass(teacher, windows, path, states, "teacher features", batch, progress)["features"]


class DistillLoss:
    """The Trainer's loss function: the student's logits against the teacher's (live or cached)."""

    def __init__(self, cfg: DistillConfig, teacher: Transformer | None, cache: dict[str, torch.Tensor] | None,
                 head_tokens: list[int] | None = None):  # fmt: skip
        self.cfg, self.teacher, self.cache = cfg, teacher, cache
        # a student with a reduced head learns the teacher's distribution renormalized over its tokens;
        # where[token] is the token's position in the head (-1: not in it), built once
        self.ids = self.where = None
        if head_tokens is not None:
            self.ids = torch.tensor(head_tokens)
            self.where = torch.full((teacher.cfg.vocab_size,), -1, dtype=torch.long)
            self.where[self.ids] = torch.arange(len(head_tokens))

    def __call__(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y, idx = batch
        logits = model(x)
        cfg = self.cfg
        if self.cache is not None and model.training:  # evaluation batches are not in the cache
            top = (self.cache["values"][idx.cpu()].to(x.device), self.cache["indices"][idx.cpu()].to(x.device))
            ce_y = None
            if self.ids is not None:
                logits, ce_y, top = self._on_head(logits, y, top)
            return distill_loss(logits, None, y, cfg.alpha, cfg.temperature, top=top, ce_targets=ce_y)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        ce_y = None
        if self.ids is not None:
            logits, ce_y, _ = self._on_head(logits, y)
            teacher_logits = teacher_logits[..., self.ids]
        return distill_loss(logits, teacher_logits, y, cfg.alpha, cfg.temperature, cfg.kl, ce_targets=ce_y)

    def _on_head(self, logits, targets, top=None):
        """Logits, targets and cached top-k moved to the reduced head's positions: a token outside the
        head leaves the cross-entropy (-100) and the top-k (its value -inf)."""
        if self.ids.device != logits.device:  # moved once, to the training device
            self.ids, self.where = self.ids.to(logits.device), self.where.to(logits.device)
        mapped = self.where[targets.clamp(min=0)]
        targets = torch.where((targets == -100) | (mapped < 0), -100, mapped)
        if top is not None:
            pos = self.where[top[1].long()]
            top = (top[0].float().masked_fill(pos < 0, float("-inf")), pos.clamp(min=0))
        return logits[..., self.ids], targets, top


def distill(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Run a distillation recipe: teacher and student, token windows, the Trainer; returns a summary."""
    from lmlab.data import fetch

    dc, cfg = distill_config(recipe), recipe.train
    teacher, tokenizer = load_pretrained(dc.teacher)
    if tokenizer is None:
        raise LmlabError("the teacher has no tokenizer", field="distill.teacher")
    teacher.eval().requires_grad_(False)
    student = build_student(dict(dc.student), teacher, recipe.source)
    data = recipe.data
    names = data.get("datasets") or []
    if not names:
        raise LmlabError("the recipe names no data: set data.datasets (fetched sets)", file=recipe.source,
                         field="data.datasets")  # fmt: skip

    def split(name: str) -> list[Path]:
        return [p for d in names if (p := Path(fetch(d)) / f"{name}.jsonl").exists()]

    train_files = split("train")
    if dc.teacher_answers is not None:  # sequence-level distillation: the teacher's own answers as data
        ta = dc.teacher_answers
        sources = [Path(fetch(d)) / "train.jsonl" for d in ta["datasets"]]
        prompts = prompts_from(sources, ta.get("max_prompts"))
        teacher.to(default_device(cfg.device))
        digest = weights_digest(teacher)  # (once: both files are vouched for by it)
        if ta.get("self_prompts"):  # requests the teacher writes itself, after the data sets' (Magpie)
            prompts += teacher_prompts(teacher, tokenizer, int(ta["self_prompts"]), Path(cfg.out_dir) /
                                       "teacher_prompts.jsonl", progress=progress, exclude=prompts, digest=digest)  # fmt: skip
        train_files.append(teacher_answers(teacher, tokenizer, prompts, Path(cfg.out_dir) / "teacher_answers.jsonl",
                                           int(ta.get("max_new_tokens", 128)), int(ta.get("batch", 32)), progress,
                                           digest))  # fmt: skip
    train_w = token_windows(tokenizer, train_files, cfg.block_size, data.get("max_windows"), cfg.seed)
    # a draft's reduced head: the tokens the training text uses most (an EAGLE draft trained further
    # keeps the head it has, whatever head_vocab says: its tokens are what it learned to score)
    if "head_vocab" in dc.student and not (student.cfg.eagle and student.cfg.head_tokens is not None):
        specials = [*stop_token_ids(teacher, tokenizer, GenerationConfig()), tokenizer.bos_token_id,
                    tokenizer.pad_token_id]  # fmt: skip
        ids = frequent_tokens(train_w, int(dc.student["head_vocab"]), {t for t in specials if t is not None})
        reduce_head(student, ids)
    if dc.freeze_embeddings:
        student.embed.weight.requires_grad_(False)
    eagle = student.cfg.eagle
    if eagle:  # its head is the target's: the loss reads the target's probabilities through it
        student.lm_head.weight.requires_grad_(False)
    val_w = token_windows(tokenizer, split("validation"), cfg.block_size, data.get("max_val_windows", 64), cfg.seed)
    rows = cfg.micro_batch_size * cfg.grad_accum
    cache, out = None, Path(cfg.out_dir)
    if eagle:  # the draft learns from the teacher's hidden states (always cached: they are reused each epoch)
        opts = eagle_options(dc.student, recipe.source)
        teacher.to(default_device(cfg.device))
        feats = cache_features(teacher, train_w, out / "teacher_features.safetensors", progress=progress)
        loss, val_loss = EagleLoss(teacher, feats, **opts), EagleLoss(teacher, None, **opts)
    else:
        if dc.teacher_logits == "cache":
            cache = cache_teacher_topk(teacher, train_w, dc.top_k, out / "teacher_topk.safetensors", progress=progress)
        head = student.cfg.head_tokens
        loss = DistillLoss(dc, teacher, cache, head)
        # validation always compares with the live teacher, so cached and online runs report the same thing
        val_loss = DistillLoss(dataclasses.replace(dc, teacher_logits="online"), teacher, None, head)
    trainer = Trainer(student, Windows(train_w, rows, seed=cfg.seed), cfg, val_data=Windows(val_w, rows, False),
                      tokenizer=tokenizer, loss_fn=loss, recipe=recipe.to_dict(), progress=progress)  # fmt: skip
    teacher.to(trainer.dist.device)
    before, agree_before = _val(trainer, val_loss)
    summary = trainer.fit()
    after, agree_after = _val(trainer, val_loss)
    summary.update(val_before=before, val_after=after, train_windows=len(train_w),
                   student_parameters=sum(p.numel() for p in student.parameters()),
                   trainable_parameters=sum(p.numel() for p in student.parameters() if p.requires_grad),
                   teacher_parameters=sum(p.numel() for p in teacher.parameters()),
                   out_dir=str(trainer.out), model=str(trainer.out / "final"))  # fmt: skip
    if agree_before is not None:  # an EAGLE draft: how often its first guess is the teacher's
        summary.update(val_agreement_before=agree_before, val_agreement_after=agree_after)
    write_json(trainer.out / "summary.json", summary)
    return summary


@torch.no_grad()
def _val(trainer: Trainer, loss: DistillLoss | EagleLoss) -> tuple[float, float | None]:
    """Mean distillation loss (live teacher) over the validation windows, and an EAGLE draft's mean top-1
    agreement with the teacher (None for other students)."""
    model, data = trainer.raw, trainer.val_data
    model.eval()
    device = next(model.parameters()).device
    vals, agree = [], []
    for i in range(data.steps_per_epoch):
        vals.append(float(loss(model, tuple(t.to(device) for t in data.get_batch(i)))))
        if isinstance(loss, EagleLoss):
            agree.append(float(loss.last_agreement))
    return sum(vals) / len(vals), (sum(agree) / len(agree) if agree else None)
