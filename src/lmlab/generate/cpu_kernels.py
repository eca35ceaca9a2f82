"""CPU kernels for decode steps: weight matmuls with few rows, and single-query attention.

A decode step feeds one token per sequence through the model. Its matmuls have as many rows as
the batch, so their speed is how fast the weights stream from memory; BLAS is tuned for large
matrices (at 8 rows MKL reads SmolLM2's weights at about 11 GB/s on a 2-core Xeon, a third of what
the memory gives). Its attention has one query per head, where torch's CPU flash attention spends
most of its time setting up tiles. Two small C++ operators do these directly:

- `lmlab::skinny_linear` (csrc/skinny_matmul.cpp): y = x Wᵀ + b for up to `MAX_ROWS` rows of x,
  reading each weight row once for all rows and prefetching ahead.
- `lmlab::decode_attention` (csrc/decode_attention.cpp): one query per (sequence, head), grouped
  heads, a boolean or additive mask.

They are x86 AVX-512 C++ compiled against torch's headers with the host's C++ compiler at first
use (about 10 s) and cached under ~/.cache/lmlab. Where they cannot run (another CPU, no compiler,
a GPU tensor, a shape they do not cover) `linear` and `attention` are torch's own functions, so
callers never need to check. Within `DecodeKernels()` every eligible `F.linear` (nn.Linear
included) and `F.scaled_dot_product_attention` call takes them, eagerly or under torch.compile,
whose compiled graph calls the operators directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "skinny_matmul.cpp", _CSRC / "decode_attention.cpp"]

MAX_ROWS = 16
"""Above this many rows BLAS is as fast or faster (its packing pays off), so `linear` leaves them to it."""

_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab")) / "kernels"


def _build_command(compiler: str, out: str) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    return [
        compiler,
        *[
            "-O3",
            "-march=native",
            "-fopenmp",
            "-shared",
            "-fPIC",
            "-std=c++20",
            "-w",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ],
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *map(str, _SOURCES),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
        "-o",
        out,
    ]


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return torch.backends.cpu.get_cpu_capability()
    return "|".join(next((line for line in info if line.startswith(f)), "") for f in ("model name", "flags"))


@functools.cache
def _load() -> bool:
    """Builds (first time on this machine) and loads the operators; False, with one warning, where
    they can't be had."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("lmlab: no C++ compiler found; decode steps use torch's kernels", stacklevel=3)
        return False
    sources = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()))  # headers included
    # -march=native code runs only on this kind of CPU: a cache shared between machines (an NFS
    # home) keeps one build per CPU model and instruction set
    key = hashlib.sha256(sources + " ".join([*_build_command(compiler, ""), torch.__version__, _cpu_id()]).encode())
    path = cache_dir() / f"decode-{key.hexdigest()[:16]}.so"
    with _lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # built to a temp name and renamed: concurrent processes never load a half-written file
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            # a one-time pause of ~10 s on the first decode that uses them: say why
            print("lmlab: compiling the decode kernels for this CPU (once, ~10 s)", file=sys.stderr, flush=True)
            try:
                done = subprocess.run(_build_command(compiler, tmp), capture_output=True, text=True)
                error = done.stderr[-2000:] if done.returncode != 0 else None
            except OSError as e:  # the compiler named by CXX is not there or not runnable
                error = str(e)
            if error is not None:
                os.unlink(tmp)
                warnings.warn(
                    f"lmlab: compiling the decode kernels failed; decode steps use torch's kernels:\n{error}",
                    stacklevel=3,
                )
                return False
            os.replace(tmp, path)
        torch.ops.load_library(str(path))
        _register_fakes()
    return True


def _register_fakes() -> None:
    # output shapes for torch.compile's tracing; the operators themselves come from the library
    @torch.library.register_fake("lmlab::skinny_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("lmlab::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)


enabled = os.environ.get("LMLAB_DECODE_KERNELS", "1") != "0"
"""LMLAB_DECODE_KERNELS=0 turns the kernels off (torch's own kernels run instead). Under
torch.compile the setting is read once, when a graph is traced."""


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing, not traced
def available() -> bool:
    """Whether the kernels run on this machine (compiling them on first call) and are enabled."""
    return enabled and _load()


def _plain(*tensors: torch.Tensor | None) -> bool:
    """float32 CPU tensors from which no gradient is wanted (the operators have no backward)."""
    grad = torch.is_grad_enabled()
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad))
        for t in tensors
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, by `lmlab::skinny_linear` where x has at most `MAX_ROWS` rows."""
    if (
        x.dim() >= 1
        and weight.dim() == 2
        and weight.shape[0] >= 2
        and weight.is_contiguous()
        and 0 < x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
        and _plain(x, weight, bias)
        and available()
    ):
        return torch.ops.lmlab.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, by `lmlab::decode_attention` where there is one query per
    head (B, H, 1, D) and nothing it does not cover (dropout, is_causal)."""
    if (
        q.dim() == k.dim() == v.dim() == 4
        and q.shape[2] == 1
        and dropout_p == 0.0
        and not is_causal
        and (enable_gqa or q.shape[1] == k.shape[1])
        and k.stride(-1) == v.stride(-1) == 1
        and (attn_mask is None or attn_mask.dim() == 4)
        and (attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32))
        and _plain(q, k, v)
        and available()
    ):
        return torch.ops.lmlab.decode_attention(q, k, v, attn_mask, scale if scale is not None else q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


class DecodeKernels(TorchFunctionMode):
    """Within this context, `F.linear` (so nn.Linear) and `F.scaled_dot_product_attention` take the
    decode kernels wherever they apply."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def for_rows(rows: int) -> contextlib.AbstractContextManager:
    """The context for an eager forward over `rows` rows (sequences, beams, or tokens of one
    sequence): `DecodeKernels()` from two rows on. The mode costs about 1 us on every torch call of
    the forward; at one row that is as much as the kernels save. Compiled graphs enter the mode
    themselves (decode._forward), where it is traced away."""
    return DecodeKernels() if rows > 1 else contextlib.nullcontext()
