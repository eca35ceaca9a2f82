"""Load and save checkpoints: Hugging Face directories (safetensors, sharded or not) and GGUF files."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmlab.errors import LmlabError
from lmlab.model.config import ModelConfig
from lmlab.model.hf import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer, load_tokenizer
from lmlab.utils.atomic import atomic_path, write_json
from lmlab.utils.packaged import PACKAGED, packaged_path

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HOW_TO_CONVERT = (
    "pickled checkpoints can run arbitrary code when loaded, so lmlab refuses them; in an environment you trust, "
    "convert once with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) "
    "(it writes model.safetensors)"
)


def _refuse_pickle(path: Path) -> None:
    raise LmlabError("refusing a pickled checkpoint", file=str(path), hint=_HOW_TO_CONVERT)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None


def _tensor_getter(directory: Path) -> Callable[[str], torch.Tensor | None]:
    """A function name -> tensor (or None) over model.safetensors or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmlabError("missing or invalid field", file=str(index), field="weight_map")
        files = {name: directory / shard for name, shard in weight_map.items()}
    elif single.exists():
        with safe_open(str(single), framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        for p in directory.iterdir():
            if p.suffix in PICKLED:
                _refuse_pickle(p)
        raise LmlabError("no model.safetensors or model.safetensors.index.json", file=str(directory))
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor | None:
        file = files.get(name)
        if file is None:
            return None
        if file not in handles:
            if not file.exists():
                raise LmlabError(f"shard listed for {name!r} is missing", file=str(file))
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(name)

    return get


# parameters a checkpoint may lack when it is loaded with a new task head: they start from a fresh init
NEW_HEAD_PARAMS = ("classifier.", "pooler.")


def build_model(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    source: str | None,
    new_head: bool = False,
) -> Transformer:
    """A Transformer holding exactly `state_dict` (our names), built without a wasted random init.

    new_head: a task head the checkpoint does not have (classifier, pooler) is initialized afresh.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied weights appear once
    state_dict = dict(state_dict)
    for name, shape in expected.items():
        if name not in state_dict and new_head and name.startswith(NEW_HEAD_PARAMS):
            fresh = torch.zeros(shape) if name.endswith("bias") else torch.randn(shape) * cfg.init_std
            state_dict[name] = fresh
        if name not in state_dict:
            raise LmlabError(f"tensor {name!r} (shape {tuple(shape)}) is missing", file=source)
        if state_dict[name].shape != shape:
            got = tuple(state_dict[name].shape)
            raise LmlabError(f"tensor {name!r} has shape {got} but the model expects {tuple(shape)}", file=source)
    sd = {name: state_dict[name].to(dtype) for name in expected}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def resolve(path: str | os.PathLike) -> Path:
    """A path as given, or the installed location of a packaged checkpoint name (smollm2-135m-instruct)."""
    if str(path) in PACKAGED and not Path(path).exists():
        return packaged_path(str(path))
    return Path(path)


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a preset name, a packaged checkpoint, a Hugging Face directory or a .gguf file,
    without reading any weights."""
    from lmlab.model.config import PRESETS

    if str(name_or_path) in PRESETS:
        return ModelConfig.from_preset(str(name_or_path))
    path = resolve(name_or_path)
    if path.suffix == ".gguf":
        from lmlab.model.gguf import _reader, gguf_config

        return gguf_config(_reader(path), str(path))
    config_file = path / "config.json"
    if not config_file.exists():
        raise LmlabError("not a preset, a .gguf file or a directory with config.json", file=str(path))
    d = _read_json(config_file)
    if d.get("model_type") == "lmlab":
        return ModelConfig.from_dict(d.get("lmlab", {}), source=str(config_file))
    return config_from_hf(d, str(config_file))


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dequantize: bool | str = True,
    **overrides: Any,
) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a Hugging Face directory or a .gguf file; tokenizer is None if none is stored.

    dequantize=False keeps a GGUF file's Q8_0/Q4_0/Q4_1 linear weights as they are stored: the layers
    become QuantLinear (model/quantized.py) and run on the quantized kernels (other block types are
    dequantized). A checkpoint written by `lmlab quantize` always loads quantized. dequantize="auto"
    keeps them where lmlab's quantized kernels run on `device` (`model.quantized.runs_quantized`):
    the same weights, the fastest exact path for inference (`lmlab generate`/`chat`).

    overrides change config fields before the weights load, e.g. `head="seq_cls", num_labels=3` puts a
    freshly initialized classifier on a pretrained trunk (as transformers' AutoModelFor... does), or
    `resid_dropout=0.1` for fine-tuning.
    """
    path = resolve(path)
    if not path.exists():
        raise LmlabError("no such file or directory", file=str(path))
    if path.suffix in PICKLED:
        _refuse_pickle(path)
    if path.suffix == ".gguf":
        from lmlab.model.gguf import load_gguf

        if dequantize == "auto":  # (decided only for GGUF files: deciding builds the kernels)
            from lmlab.model.quantized import runs_quantized

            dequantize = not runs_quantized(device)
        cfg, sd, tokenizer = load_gguf(path, dtype, keep_quantized=not dequantize)
        cfg = _override(cfg, overrides, str(path))
        if any(name.endswith(".qweight") for name in sd):
            from lmlab.model.quantized import QuantConfig, build_quantized

            bits = 4 if any(t.dtype == torch.uint8 for t in sd.values()) else 8
            qcfg = QuantConfig(bits=bits, group_size=32, method="gguf")
            return build_quantized(cfg, sd.get, qcfg, str(path)).to(device), tokenizer
        return build_model(cfg, sd, dtype, str(path), new_head=bool(overrides)).to(device), tokenizer
    if not path.is_dir():
        raise LmlabError("expected a Hugging Face model directory or a .gguf file", file=str(path))
    config_file = path / "config.json"
    if not config_file.exists():
        raise LmlabError("no config.json in this directory", file=str(path))
    d = _read_json(config_file)
    get = _tensor_getter(path)
    if "quantization_config" in d:
        model = _load_quantized(d, get, str(config_file), overrides).to(device)
        return model, load_tokenizer(path) if (path / "tokenizer.json").exists() else None
    if d.get("model_type") == "lmlab":
        cfg = _override(ModelConfig.from_dict(d.get("lmlab", {}), source=str(config_file)), overrides, str(path))
        with torch.device("meta"):
            names = [n for n, _ in Transformer(cfg).named_parameters()]
        sd = {n: t for n in names if (t := get(n)) is not None}
    else:
        cfg = _override(config_from_hf(d, str(config_file)), overrides, str(path))
        with torch.device("meta"):
            expected = {n: p.shape for n, p in Transformer(cfg).named_parameters()}
        optional = {n for n in expected if n.startswith(NEW_HEAD_PARAMS)} if overrides else set()
        sd = state_dict_from_hf(cfg, expected, get, str(path), optional=optional)
    model = build_model(cfg, sd, dtype, str(path), new_head=bool(overrides)).to(device)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def _load_quantized(d: dict, get: Callable, source: str, overrides: dict[str, Any]) -> Transformer:
    """A model whose linear layers hold int8/int4 codes (model/quantized.py), as save_pretrained wrote it."""
    from lmlab.model.quantized import QuantConfig, build_quantized

    qcfg = QuantConfig.from_dict(d["quantization_config"], source)
    cfg = _override(ModelConfig.from_dict(d.get("lmlab", {}), source=source), overrides, source)
    return build_quantized(cfg, get, qcfg, source)


def _override(cfg: ModelConfig, overrides: dict[str, Any], source: str) -> ModelConfig:
    if not overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise LmlabError(f"unknown model config field (known: {', '.join(sorted(known))})", file=source, field=key)
    if overrides.get("head") in ("seq_cls", "token_cls") and cfg.family == "bert":
        # BERT classifies from its pooler (as BertForSequenceClassification); tokens need none
        overrides = {"pooler": overrides["head"] == "seq_cls", **overrides}
        if overrides["head"] == "seq_cls":
            overrides.setdefault("cls_pooling", "pooler")
        overrides.setdefault("cls_bias", True)
    return dataclasses.replace(cfg, **overrides)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(
    model: Transformer,
    tokenizer: Tokenizer | None,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write a Hugging Face directory (config.json, safetensors, tokenizer); transformers loads it when
    the architecture is one of its families, lmlab always."""
    if getattr(model, "quant_config", None) is not None:
        return _save_quantized(model, tokenizer, Path(directory))
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}  # tied weights once
    return save_state(model.cfg, params, tokenizer, directory, max_shard_bytes=max_shard_bytes)


def _save_quantized(model: Transformer, tokenizer: Tokenizer | None, directory: Path) -> Path:
    """lmlab's own format: our tensor names, codes and scales as stored in memory, the settings in
    config.json's quantization_config (transformers' quantized formats pack codes differently)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    config = {
        "model_type": "lmlab",
        "dtype": "float32",
        "lmlab": {**model.cfg.to_dict(), "extra": {}},
        "quantization_config": model.quant_config.to_dict(),
    }
    write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def save_state(
    cfg: ModelConfig,
    params: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """save_pretrained for a bare state dict under our names (e.g. gathered from sharded training)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if cfg.tie_embeddings:  # the head shares the embedding: store it once
        params = {n: t for n, t in params.items() if n not in ("lm_head.weight", "mlm_head.decoder.weight")}
    dtype = next(iter(params.values())).dtype
    hf_config = config_to_hf(cfg)
    if hf_config is not None:
        tensors = state_dict_to_hf(cfg, params)
        config = {**hf_config, "dtype": _dtype_name(dtype)}
    else:
        tensors = {n: t.contiguous() for n, t in params.items()}
        config = {"model_type": "lmlab", "dtype": _dtype_name(dtype), "lmlab": {**cfg.to_dict(), "extra": {}}}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(directory / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(
            directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
        (directory / "model.safetensors").unlink(missing_ok=True)
    write_json(directory / "config.json", config)
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    if gen:
        write_json(directory / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
