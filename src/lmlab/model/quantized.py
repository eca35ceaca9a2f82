"""Quantized linear layers (weights as int8/int4 codes), and swapping them into a model.

A `QuantLinear` holds int8 or packed int4 codes with per-group float32 scales (and offsets for
int4) as buffers, and multiplies float activations by them through kernels/quant.py: on a CPU the
weights stay quantized in memory and are turned into floats a register at a time. The codes come
from compress/ (round-to-nearest, GPTQ) or straight from a GGUF file's Q8_0/Q4_0 blocks;
`checkpoint.py` rebuilds the layers from a saved quantized checkpoint.

The quantization settings travel in config.json as `quantization_config`, with transformers' key
names where they exist (quant_method, bits, group_size, sym, desc_act, modules_not_to_convert);
the tensors are `<layer>.qweight`, `<layer>.scales` and, for int4, `<layer>.offsets`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lmlab.errors import LmlabError
from lmlab.kernels import quant
from lmlab.model.config import ModelConfig
from lmlab.utils.device import policy

ACTIVATIONS = ("float32", "int8", "int16", "int24")
"""QuantConfig.activations: how a quantized prefill treats its activations (see there)."""


@dataclass
class QuantConfig:
    """How a model's linear layers are quantized."""

    bits: int = 8
    group_size: int | None = None  # None: one scale per output channel (int8 only)
    sym: bool = True  # int4: code * scale - 8 * scale; otherwise code * scale + offset
    method: str = "rtn"  # rtn | gptq | gguf
    desc_act: bool = False  # GPTQ's act-order
    modules_not_to_convert: list[str] = field(default_factory=list)
    # How a prefill's activations (inputs of more rows than the device policy's int8_prefill_rows,
    # a batch's tokens together; a VNNI CPU only) meet the per-channel int8 codes: rounded per token
    # to integers and multiplied int8 x int8 (oneDNN's VNNI kernels) in base-256 limbs, or not.
    # "int24" (the default for per-channel int8): three limbs, each activation within max |x| / 2^23
    # of its value: a few times float32's rounding (SmolLM2's 512-token prefill: logits 5.2e-6 of the
    # largest from float64's, float32's 2.0e-6; more where weights ignore a row's huge entries), at
    # ~1.2-1.5x the float32 prefill.
    # "float32": weight-only, the dequantized model's result up to summation order. "int16": two
    # limbs, ~2x the float32 prefill, logits within ~1e-3, perplexity float32's to four digits.
    # "int8": W8A8 dynamic, as llama.cpp's Q8_0: ~2.8x, perplexity +3.5% (a few outlier channels set
    # each token's scale). docs/compress.md has the figures. Grouped weights (int4, GGUF blocks)
    # take "float32" only (an integer matmul cannot apply a scale per 32 weights); decode steps and
    # short prompts run on the exact kernels whatever this says.
    activations: str | None = None  # None: "int24" for per-channel int8, otherwise "float32"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise LmlabError(f"bits must be 8 or 4, not {self.bits}", field="bits")
        if self.bits == 4 and self.group_size is None:
            raise LmlabError("int4 needs a group size (32, 64, 128, ...)", field="group_size")
        if self.activations is None:
            self.activations = "int24" if self.bits == 8 and self.group_size is None else "float32"
        if self.activations not in ACTIVATIONS:
            raise LmlabError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {self.activations!r}",
                             field="activations")  # fmt: skip
        if self.activations != "float32" and (self.bits != 8 or self.group_size is not None):
            raise LmlabError(f"{self.activations} activations need per-channel int8 weights (bits 8, no group size)",
                             field="activations")  # fmt: skip
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % quant.BLOCK):
            raise LmlabError(
                f"the group size must be a positive multiple of 32, not {self.group_size}", field="group_size"
            )

    def groups(self, in_features: int, name: str = "") -> int:
        """How many scale groups a row of `in_features` weights has; a clear error if it does not divide."""
        g = self.group_size or in_features
        if in_features % g or (self.group_size is None and in_features % 16):
            what = f"group size {g}" if self.group_size else "per-channel int8 (needs a multiple of 16)"
            raise LmlabError(
                f"{what} does not divide the width {in_features} of {name or 'a layer'}", field="group_size"
            )
        return in_features // g

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        return {"quant_method": "lmlab", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> QuantConfig:
        keys = {k: v for k, v in d.items() if k != "quant_method"}
        unknown = set(keys) - set(cls.__dataclass_fields__)
        if d.get("quant_method") != "lmlab" or unknown:
            raise LmlabError(
                f"unsupported quantization_config (quant_method {d.get('quant_method')!r}"
                + (f", keys {sorted(unknown)}" if unknown else "")
                + "); lmlab reads its own int8/int4 checkpoints and GGUF files",
                file=source,
                field="quantization_config",
            )
        return cls(**keys)


# activations the integer path may round (float64, say, asks for more precision than any of it keeps)
_ROUNDABLE = (torch.float32, torch.bfloat16, torch.float16)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 or int4 codes and float32 scales (offsets for int4)."""

    def __init__(self, in_features: int, out_features: int, bits: int, groups: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        codes = (out_features, in_features) if bits == 8 else (out_features, in_features // 2)
        self.register_buffer("qweight", torch.zeros(codes, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("offsets", torch.zeros(out_features, groups) if bits == 4 else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    activations = "float32"  # set by attach_config from QuantConfig.activations (per-channel int8 only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the device policy says where integer activations run (a VNNI CPU's prefill, where they were
        # measured); elsewhere the dequantized, exact path
        rows = policy(x.device).int8_prefill_rows if self.activations != "float32" else None
        if rows is not None and x.numel() > rows * self.in_features and x.dtype in _ROUNDABLE:
            return quant.DYNAMIC_LINEARS[self.activations](x, self.qweight, self.scales, self.bias)
        if self.bits == 8:
            return quant.int8_linear(x, self.qweight, self.scales, self.bias)
        return quant.int4_linear(x, self.qweight, self.scales, self.offsets, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (out, in): what the layer computes with."""
        if self.bits == 8:
            return quant.dequantize_int8(self.qweight, self.scales)
        return quant.dequantize_int4(self.qweight, self.scales, self.offsets)

    def extra_repr(self) -> str:
        groups = self.scales.shape[1]
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.in_features // groups}"


def replace_linear(model: nn.Module, name: str, linear: nn.Linear, q: tuple) -> QuantLinear:
    """Put a QuantLinear holding `q` = (qweight, scales, offsets or None) where `linear` was (its bias kept)."""
    qweight, scales, offsets = q
    bits = 8 if qweight.dtype == torch.int8 else 4
    layer = QuantLinear(linear.in_features, linear.out_features, bits, scales.shape[1], linear.bias is not None)
    layer.qweight.copy_(qweight)
    layer.scales.copy_(scales)
    if offsets is not None:
        layer.offsets.copy_(offsets)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach().float())
    set_module(model, name, layer.to(linear.weight.device))
    return layer


def quantizable(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The linear layers a QuantConfig converts: every nn.Linear of the decoder stack and the LM head,
    except those named in modules_not_to_convert (classifier heads and poolers stay float)."""
    skip = set(config.modules_not_to_convert)
    out = []
    for name, m in model.named_modules():
        wanted = name.startswith("layers.") or name == "lm_head"
        if wanted and type(m) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip):
            out.append((name, m))
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight where it shares the embedding's: the head is quantized, the
    embedding lookup stays float (it reads one row per token, not the whole matrix)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        model.cfg = dataclasses.replace(model.cfg, tie_embeddings=False)  # tie_weights() must not re-tie


def build_quantized(
    cfg: ModelConfig, get: Callable[[str], torch.Tensor | None], config: QuantConfig, source: str | None = None
) -> nn.Module:
    """A Transformer from stored tensors under our names, where each linear layer with a
    `<name>.qweight` becomes a QuantLinear (int8 codes: 8 bits, uint8: packed int4; groups from the
    scales' shape) and every other tensor loads as float32."""
    from lmlab.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        for name, m in quantizable(model, QuantConfig()):
            q = get(f"{name}.qweight")
            if q is None:
                continue
            bits = 8 if q.dtype == torch.int8 else 4
            groups = get(f"{name}.scales").shape[1]
            set_module(model, name, QuantLinear(m.in_features, m.out_features, bits, groups, m.bias is not None))
    sd = {}
    for name, t in model.state_dict(keep_vars=True).items():
        stored = get(name)
        if stored is None:
            raise LmlabError(f"tensor {name!r} (shape {tuple(t.shape)}) is missing", file=source)
        if stored.shape != t.shape or stored.dtype.is_floating_point != t.dtype.is_floating_point:
            raise LmlabError(f"tensor {name!r} is {stored.dtype} {tuple(stored.shape)}, expected {t.dtype} "
                             f"{tuple(t.shape)}", file=source)  # fmt: skip
        sd[name] = stored.float() if stored.dtype.is_floating_point else stored
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers()
    attach_config(model, config)
    return model.eval()


def attach_config(model: nn.Module, config: QuantConfig) -> None:
    """Record `config` on a quantized model (save_pretrained writes it) and tell its layers how to run."""
    model.quant_config = config
    for m in model.modules():
        if isinstance(m, QuantLinear):
            per_channel = m.bits == 8 and m.scales.shape[1] == 1
            m.activations = config.activations if per_channel else "float32"


def runs_quantized(device: str | torch.device) -> bool:
    """Whether inference on `device` should keep a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are
    (`load_pretrained(..., dequantize=False)`): where lmlab's quantized CPU kernels run, they are the
    same weights streamed at a quarter or an eighth of float32's bytes, so decoding is faster and
    the result is the same up to summation order. Elsewhere (a GPU, a CPU without AVX-512 or a
    compiler) every call would dequantize them, and float32 weights are faster."""
    from lmlab.utils.device import policy

    return policy(device).cpu_kernels and quant.available()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model takes in memory and on disk."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
