"""LoRA: train a low-rank update B @ A beside frozen weights, W x + (alpha / r) * B A x.

The adapter wraps the model's existing linear layers in place (the weight keeps its name, so the
base checkpoint still maps), and is saved the way `peft` saves one (adapter_config.json +
adapter_model.safetensors), so transformers/peft users load it with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmlab.errors import LmlabError
from lmlab.model.hf import hf_name
from lmlab.model.quantized import QuantLinear
from lmlab.model.transformer import Transformer
from lmlab.utils.atomic import atomic_path, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# our module names, and the names users of transformers/peft know them by
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ALIASES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
    "down_proj": "down", "query": "q", "key": "k", "value": "v", "dense": "o",
}  # fmt: skip
_TASK_TYPES = {"lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "none": "FEATURE_EXTRACTION"}


@dataclass
class LoraConfig:
    """Which layers get an adapter and how big it is (PEFT's names where they exist)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # or "all" / "all-linear"
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    modules_to_save: list[str] = field(default_factory=list)  # fully trained and saved: "classifier", "pooler"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = list(TARGETS) if self.targets in ("all", "all-linear") else [self.targets]
        self.targets = [ALIASES.get(t, t) for t in self.targets]
        for t in self.targets:
            if t not in TARGETS:
                raise LmlabError(f"unknown LoRA target {t!r}; targets: {', '.join(TARGETS)}", field="lora.targets")
        if self.r <= 0:
            raise LmlabError(f"rank must be > 0, got {self.r}", field="lora.r")
        if not 0 <= self.dropout < 1:
            raise LmlabError(f"dropout must be in [0, 1), got {self.dropout}", field="lora.dropout")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Linear):
    """A linear layer that keeps its own weight and bias (frozen) and adds scaling * B(A(dropout(x))).

    The base may be a quantized layer (model/quantized.py's QuantLinear: QLoRA-style fine-tuning, the
    frozen base held as int8/int4 codes and the adapter in float32); it then stays a submodule,
    `quantized_base`, and the adapter cannot be merged into it (merge into the float base instead)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # adopt the base layer's parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantLinear):
            self.quantized_base = base
            self.weight, self.bias = None, None
            dev, dtype = base.scales.device, torch.float32
        else:
            self.quantized_base = None
            self.weight, self.bias = base.weight, base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            dev, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        # as peft: A like nn.Linear's default init, B zero, so training starts from the base model exactly
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.merged = False
        self.disabled = False  # adapters_disabled(): the base layer alone (DPO/PPO's reference model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.quantized_base is None else self.quantized_base(x)
        if self.merged or self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The weight update the adapter stands for: scaling * B @ A (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight (inference without the extra matmuls)."""
        if self.quantized_base is not None:
            raise LmlabError(
                "a LoRA adapter on a quantized base cannot be merged into its int8/int4 codes",
                hint="merge it into the float base (lmlab merge BASE ADAPTER OUT), then quantize the result",
            )
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the weight."""
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def _linear_modules(model: Transformer, targets: list[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        parts = name.split(".")
        # layers.{i}.attn.{q,k,v,o} and layers.{i}.mlp.{gate,up,down}
        linear = isinstance(m, (nn.Linear, QuantLinear))
        if len(parts) == 4 and parts[0] == "layers" and parts[3] in targets and linear:
            out.append((name, m))
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class LoraAdapter:
    """What a model carries once LoRA is applied: its config, and how its checkpoints are written and read."""

    def __init__(self, config: LoraConfig) -> None:
        self.config = config

    def owns(self, name: str) -> bool:
        """True for parameters the adapter trains and saves (our names)."""
        return ".lora_" in name or name.startswith(tuple(m + "." for m in self.config.modules_to_save))

    def write(self, model: Transformer, params: dict[str, torch.Tensor], directory: Path) -> None:
        """Write adapter files into `directory` (the Trainer's checkpoint writer)."""
        write_adapter(model, params, directory, self.config)

    def read(self, model: Transformer, directory: Path) -> dict[str, torch.Tensor]:
        """The adapter's tensors under our names (the Trainer's resume)."""
        return read_adapter_tensors(model, directory)[1]


def apply_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Wrap the target linear layers with LoRA and freeze everything else but `modules_to_save` (in place)."""
    if getattr(model, "adapter", None) is not None:
        raise LmlabError("this model already has a LoRA adapter", hint="merge it first (merge_lora)")
    found = _linear_modules(model, config.targets)
    if not found:
        raise LmlabError(f"no layer matches the LoRA targets {config.targets}", field="lora.targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found:
        _set_module(model, name, LoRALinear(linear, config.r, config.scaling, config.dropout))
    for prefix in config.modules_to_save:
        module = getattr(model, prefix, None)
        if not isinstance(module, nn.Module):
            raise LmlabError(f"the model has no module {prefix!r} to train fully", field="lora.modules_to_save")
        for p in module.parameters():
            p.requires_grad_(True)
    model.adapter = LoraAdapter(config)
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every LoRA-wrapped layer of a model."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block: every (unmerged) adapter is skipped, nothing is copied."""
    layers = lora_layers(model)
    if any(m.merged for m in layers):
        raise LmlabError("cannot disable merged adapters", hint="unmerge_lora first")
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: Transformer) -> None:
    """Fold every adapter into its weight, in place (unmerge_lora takes them out again)."""
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: Transformer) -> None:
    """Undo merge_lora."""
    for m in lora_layers(model):
        m.unmerge()


def merge_and_unload(model: Transformer) -> Transformer:
    """Merge the adapters and turn the wrapped layers back into plain nn.Linear: a normal model again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            _set_module(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.adapter = None
    return model


# -- the PEFT file format --------------------------------------------------------------------------
def _hf_module(model: Transformer, ours: str) -> str:
    """The transformers module path of one of our modules (as it sits inside PEFT's base_model.model)."""
    cfg = model.cfg
    if cfg.family is None:
        raise LmlabError(
            "this model has no transformers family, so its adapter has no PEFT name",
            hint="use a llama, mistral, qwen2, gpt2 or bert model",
        )
    name = hf_name(cfg.family, ours + ".weight", cfg.head).removesuffix(".weight")
    if cfg.family == "bert" and cfg.head == "none":
        name = name.removeprefix("bert.")  # BertModel has no "bert." prefix
    if cfg.family == "bert" and name.endswith("pooler.dense"):
        name = name.removesuffix(".dense")
    return name


def _peft_key(model: Transformer, ours: str) -> str:
    module, _, tail = ours.rpartition(".")
    if ".lora_" in ours:  # layers.0.attn.q.lora_A.weight
        base, _, which = module.rpartition(".")
        if model.cfg.family == "gpt2" and base.split(".")[-1] in "qkv":
            raise LmlabError(
                "GPT-2 fuses q, k and v into one c_attn layer, so separate q/k/v adapters have no PEFT form",
                field="lora.targets",
                hint="target o, up or down on GPT-2",
            )
        return f"base_model.model.{_hf_module(model, base)}.{which}.{tail}"
    hf = hf_name(model.cfg.family, ours, model.cfg.head)
    if model.cfg.family == "bert" and model.cfg.head == "none":
        hf = hf.removeprefix("bert.")
    return f"base_model.model.{hf}"


def _target_names(model: Transformer, config: LoraConfig) -> list[str]:
    # the last two components pin the layer down (GPT-2 has attn.c_proj and mlp.c_proj)
    names = {".".join(_hf_module(model, n).split(".")[-2:]) for n, _ in _linear_modules(model, config.targets)}
    return sorted(names)


def adapter_config_dict(model: Transformer, config: LoraConfig, base: str | None = None) -> dict[str, Any]:
    """adapter_config.json as peft writes it."""
    fan_in_fan_out = model.cfg.family == "gpt2"  # GPT-2's Conv1D stores (in, out)
    to_save = None
    if config.modules_to_save:
        to_save = sorted({_hf_module(model, m).split(".")[-1] for m in config.modules_to_save})
    return {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get(model.cfg.head),
        "base_model_name_or_path": base,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, config),
        "modules_to_save": to_save,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_adapter(
    model: Transformer,
    params: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    config: LoraConfig,
    base: str | None = None,
) -> Path:
    """Write `params` (the adapter's tensors, our names) as a PEFT adapter directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {_peft_key(model, n): t.detach().cpu().contiguous() for n, t in params.items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, adapter_config_dict(model, config, base))
    cfg = model.cfg
    if cfg.head in ("seq_cls", "token_cls"):  # peft leaves the head's shape to the user; keep it for `merge`
        head = {k: getattr(cfg, k) for k in ("head", "num_labels", "labels", "cls_pooling", "cls_bias", "pooler")}
        write_json(directory / "head.json", head)
    return directory


def save_adapter(
    model: Transformer, directory: str | os.PathLike, base: str | None = None, tokenizer: Any = None
) -> Path:
    """Save a LoRA model's adapter (not the base weights) in PEFT's format."""
    adapter = getattr(model, "adapter", None)
    if adapter is None:
        raise LmlabError("this model has no LoRA adapter to save")
    params = {n: p for n, p in model.named_parameters() if adapter.owns(n)}
    out = write_adapter(model, params, directory, adapter.config, base)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """(our LoraConfig, the raw dict) from an adapter_config.json written by peft or lmlab."""
    file = Path(directory) / ADAPTER_CONFIG
    if not file.exists():
        raise LmlabError("not a LoRA adapter directory (no adapter_config.json)", file=str(directory))
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"invalid JSON: {e.msg}", file=str(file), line=e.lineno) from None
    if d.get("peft_type") != "LORA":
        raise LmlabError(f"adapter type {d.get('peft_type')!r} is not supported (only LORA)", file=str(file),
                         field="peft_type")  # fmt: skip
    unsupported = [
        ("use_dora", bool(d.get("use_dora"))),
        ("bias", d.get("bias", "none") != "none"),
        ("rank_pattern", bool(d.get("rank_pattern"))),
        ("alpha_pattern", bool(d.get("alpha_pattern"))),
        ("layers_to_transform", d.get("layers_to_transform") is not None),
        ("lora_bias", bool(d.get("lora_bias"))),
    ]
    for key, bad in unsupported:
        if bad:
            raise LmlabError(f"{key}={d[key]!r} is not supported", file=str(file), field=key)
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in d:
            raise LmlabError("required field is missing", file=str(file), field=key)
    cfg = LoraConfig(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0.0),
                     targets=["q"], use_rslora=bool(d.get("use_rslora")))  # fmt: skip
    return cfg, d


def _peft_targets(model: Transformer, d: dict[str, Any], source: str) -> list[str]:
    """Our target names for peft's target_modules (a list matched by suffix, or one regex)."""
    wanted = d["target_modules"]
    found = set()
    for name, _ in _linear_modules(model, list(TARGETS)):
        hf = _hf_module(model, name)
        if isinstance(wanted, str):
            hit = re.fullmatch(wanted, hf) is not None
        else:
            hit = any(hf == t or hf.endswith("." + t) for t in wanted)
        if hit:
            found.add(name.split(".")[-1])
    if not found:
        raise LmlabError(f"no layer of this model matches target_modules {wanted}", file=source, field="target_modules")
    return sorted(found, key=TARGETS.index)


def read_adapter_tensors(
    model: Transformer, directory: str | os.PathLike
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter's config (targets resolved against `model`) and tensors under our names."""
    directory = Path(directory)
    config, raw = read_adapter_config(directory)
    source = str(directory / ADAPTER_CONFIG)
    config.targets = _peft_targets(model, raw, source)
    keep = raw.get("modules_to_save") or []
    config.modules_to_save = [m for m in ("classifier", "pooler") if getattr(model, m, None) is not None
                              and _hf_module(model, m).split(".")[-1] in keep]  # fmt: skip
    weights = directory / ADAPTER_WEIGHTS
    if not weights.exists():
        pickled = directory / "adapter_model.bin"
        hint = "convert it with peft in a trusted environment (safe_serialization=True)" if pickled.exists() else None
        raise LmlabError("no adapter_model.safetensors", file=str(directory), hint=hint)
    with safe_open(str(weights), framework="pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    # which of our parameters the adapter holds, under the names peft gives them
    names = [f"{n}.lora_{ab}.weight" for n, _ in _linear_modules(model, config.targets) for ab in "AB"]
    for m in config.modules_to_save:
        names += [f"{m}.{p}" for p, _ in getattr(model, m).named_parameters()]
    ours = {}
    for name in names:
        key = _peft_key(model, name)
        t = theirs.get(key)
        if t is None:
            raise LmlabError(f"tensor {key!r} is missing", file=str(weights))
        ours[name] = t
    return config, ours


def load_adapter(model: Transformer, directory: str | os.PathLike) -> Transformer:
    """Apply a saved LoRA adapter (lmlab's or peft's) to a base model, in place."""
    config, tensors = read_adapter_tensors(model, directory)
    apply_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise LmlabError(f"{name}: adapter shape {tuple(t.shape)}, model {tuple(params[name].shape)}",
                                 file=str(directory))  # fmt: skip
            params[name].copy_(t)
    return model


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`lmlab merge`: base checkpoint + adapter -> one merged checkpoint directory."""
    from lmlab.model.checkpoint import load_pretrained, save_pretrained

    overrides = _head_overrides(adapter)
    model, tokenizer = load_pretrained(base, **overrides)
    load_adapter(model, adapter)
    merge_and_unload(model)
    if (Path(adapter) / "tokenizer.json").exists():
        from lmlab.tokenizer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(adapter)
    return save_pretrained(model, tokenizer, out)


def _head_overrides(adapter: str | os.PathLike) -> dict[str, Any]:
    """The task head an lmlab adapter was trained with (stored beside it), to rebuild it on the base."""
    file = Path(adapter) / "head.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
