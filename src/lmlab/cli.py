"""The `lmlab` command: parse arguments, call one library function, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lmlab.errors import LmlabError


def _model_info(args: argparse.Namespace) -> None:
    from lmlab.model.checkpoint import load_config
    from lmlab.model.info import format_info, model_info

    info = model_info(load_config(args.model), args.context)
    print(json.dumps(info, indent=2) if args.json else format_info(args.model, info))


def _convert(args: argparse.Namespace) -> None:
    import torch

    from lmlab.model.checkpoint import load_pretrained, save_pretrained

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load_pretrained(args.src, dtype=dtype)
    out = save_pretrained(model, tokenizer, args.dst)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="lmlab", description="Build, train, evaluate and serve language models.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameters, FLOPs and KV-cache bytes per token, and the switches")
    info.add_argument("model", help="a preset name, a packaged checkpoint, a Hugging Face directory or a .gguf file")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs (default: the model's)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)

    convert = sub.add_parser(
        "convert", help="convert a checkpoint (.gguf or HF directory) to a HF safetensors directory"
    )
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    convert.set_defaults(func=_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user mistakes print one line and exit 1, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
