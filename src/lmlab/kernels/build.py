"""Compiling and loading lmlab's C++ CPU operators (csrc/*.cpp), once per machine.

The operators are x86 C++ written against torch's headers and registered with TORCH_LIBRARY under
`torch.ops.lmlab`: the fused training ops with ATen's portable vectors (built for AVX-512 or AVX2),
the decode ops with AVX-512 intrinsics (left out of an AVX2 build). They are compiled with the host's C++ compiler at first
use (10-20 s, said on stderr) into one shared library, cached under ~/.cache/lmlab/kernels (or
$LMLAB_CACHE/kernels) and keyed on the sources, the flags, torch's version and the CPU. Where they
can't be had (another instruction set, no compiler, a failed build) `load()` is False, with one
warning, and every caller uses torch's own kernels. LMLAB_KERNELS=0 turns them all off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab")) / "kernels"


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp"))


def isa() -> str | None:
    """The instruction set the kernels are built for: "avx512", "avx2", or None (not x86, or older).
    LMLAB_KERNELS_ISA=avx2 builds the AVX2 variant on an AVX-512 CPU (to test it)."""
    have = torch.backends.cpu.get_cpu_capability()
    if have in ("AVX512", "AVX512_BF16", "AMX"):
        return "avx2" if os.environ.get("LMLAB_KERNELS_ISA") == "avx2" else "avx512"
    return "avx2" if have == "AVX2" else None


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    # ATen's vector types follow CPU_CAPABILITY; the AVX2 build targets any AVX2 + FMA CPU
    target = {
        "avx512": ["-march=native", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
        "avx2": ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    }[isa() or "avx2"]
    return [
        *["-O3", "-fopenmp", "-fPIC", "-std=c++20", "-w"],
        *target,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]


def _link_flags(out: str) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return ["-shared", "-fopenmp", f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", out]


def _compile(compiler: str, out: str) -> str | None:
    """Compiles the sources side by side (one per core), then links `out`; the error, if any."""

    def run(command: list[str]) -> str | None:
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:  # the compiler named by CXX is not there or not runnable
            return str(e)
        return done.stderr[-2000:] if done.returncode != 0 else None

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objects = [str(Path(tmp) / f"{src.stem}.o") for src in _sources()]
        commands = [[compiler, *_flags(), "-c", str(src), "-o", obj] for src, obj in zip(_sources(), objects)]
        error = next((e for e in pool.map(run, commands) if e is not None), None)
        return error or run([compiler, *objects, *_link_flags(out)])


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return torch.backends.cpu.get_cpu_capability()
    return "|".join(next((line for line in info if line.startswith(f)), "") for f in ("model name", "flags"))


@functools.cache
def load() -> bool:
    """Builds (first time on this machine) and loads the operators; False, with one warning, where
    they can't be had. `has("op")` tells which ones an AVX2 build has."""
    if os.environ.get("LMLAB_KERNELS", "1") == "0":
        return False
    if isa() is None:
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("lmlab: no C++ compiler found; torch's own CPU kernels run instead", stacklevel=3)
        return False
    sources = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()))  # headers included
    # -march=native code runs only on this kind of CPU: a cache shared between machines (an NFS
    # home) keeps one build per CPU model and instruction set
    recipe = [compiler, _compiler_version(compiler), *_flags(), *_link_flags(""), torch.__version__]
    recipe += [torch.version.git_version or "", _cpu_id()]
    key = hashlib.sha256(sources + " ".join(recipe).encode())
    path = cache_dir() / f"lmlab-{key.hexdigest()[:16]}.so"
    with _lock:
        try:
            if not path.exists():
                error = _build(compiler, path)
                if error is not None:
                    warnings.warn(f"lmlab: compiling the CPU kernels failed; torch's own kernels run instead:\n{error}",
                                  stacklevel=3)  # fmt: skip
                    return False
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as e:  # an unwritable cache, a library that will not load
            warnings.warn(f"lmlab: the CPU kernels can't be used ({e}); torch's own kernels run instead", stacklevel=3)
            return False
    return True


def _build(compiler: str, path: Path) -> str | None:
    """Compiles to a temp name in the cache and renames it to `path`: concurrent processes never
    load a half-written file. The error, if any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    # a one-time pause on first use: say why
    print("lmlab: compiling CPU kernels for this machine (once, 10-20 s)", file=sys.stderr, flush=True)
    try:
        error = _compile(compiler, tmp)
        if error is None:
            os.chmod(tmp, 0o755)  # mkstemp makes it private; a shared cache must be readable by all
            os.replace(tmp, path)
        return error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def has(op: str) -> bool:
    """Whether the loaded library provides `torch.ops.lmlab.<op>` (the decode ops need AVX-512)."""
    return load() and hasattr(torch.ops.lmlab, op)
