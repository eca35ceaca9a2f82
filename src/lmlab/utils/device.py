"""Every choice that depends on the device, in one place: which device a command uses, and the sizes,
kernels and compile modes that differ between a CPU and a GPU.

A constant tuned on a 2-core CPU (a loss chunk of a few hundred rows, a 1024^3 matmul to measure the
peak) would make a GPU launch-bound, and a GPU's choices would make a CPU run out of cache. Code asks
`policy(device)` instead of writing a number, so that no CPU constant runs on a GPU by accident.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """The device a command runs on: `requested` when given ("cpu", "cuda", "cuda:1", "mps"), else
    $LMLAB_DEVICE, else CUDA when there is one, else the CPU. Under torchrun, CUDA means this process's
    local GPU."""
    name = requested if requested not in (None, "", "auto") else os.environ.get("LMLAB_DEVICE") or None
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmlabError(f"unknown device {name!r}", field="device", hint="cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LmlabError("--device cuda asked for, but torch sees no GPU", field="device", hint="use cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmlabError("--device mps asked for, but torch sees no Apple GPU", field="device", hint="use cpu")
    return device


@dataclass(frozen=True)
class DevicePolicy:
    """The device-dependent knobs. CPU: sized for caches and few threads; GPU: for launch overhead."""

    kind: str
    loss_logit_bytes: int  # fp32 logits one chunk of the linear cross-entropy may hold
    loss_min_rows: int  # a chunk never has fewer rows (small matmuls waste the device)
    loss_max_rows: int
    peak_matmul_n: int  # the square matmul that measures the peak FLOP/s for MFU
    cpu_kernels: bool  # lmlab's C++ CPU operators may run
    trace_loss: bool  # under torch.compile the loss is traced into the graph (else: the eager chunk loop)
    decode_compile_mode: str | None  # torch.compile mode of the compiled decode step
    pin_memory: bool  # host batches go through pinned memory, copied without blocking
    sync_every_step: bool  # the step reads loss and grad norm on the host (else: only when it logs)
    # the LM loss drops positions labelled -100 before the vocabulary projection; finding them reads
    # a flag on the host, which on a GPU stalls the queued step (an MLM head drops them anyway: 85% saved)
    drop_ignored_rows: bool = True
    # integer activations (QuantConfig.activations "int24", the per-channel int8 default, "int16",
    # "int8"): inputs of more rows than this go through oneDNN's int8 matmul (measured 1.1-1.3x,
    # 1.6x and 2.4x llama.cpp Q8_0 on a VNNI CPU's 512-token prefill; up to 64 rows the float32
    # skinny kernels are about as fast); None: never (float32 activations)
    int8_prefill_rows: int | None = None
    # speculative rounds check a candidate tree by default (generate/draft_tree.py), not a chain:
    # where a check's extra rows cost next to nothing (a GPU streams the weights once for all of them).
    # On 2 CPU cores a tree's 7-row check costs about a chain's 5-row one, but its rounds measured from
    # 0.96x to 1.08x the chain's (benchmarks/speculative_generate.py): off there.
    draft_tree: bool = False


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies int8 by VNNI dot products (AVX-512 VNNI or AVX-VNNI). Without them
    oneDNN's int8 matmul sums byte pairs into saturating 16-bit lanes (its int8 guide), so integer
    activations could come back clipped: the policy keeps such CPUs on the exact path."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: a capability that implies VNNI
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_policy(vnni: bool) -> DevicePolicy:
    """The CPU's policy; integer activations only where VNNI multiplies int8 (see cpu_has_vnni)."""
    # (64 rows: where the C++ skinny kernels stop, kMaxSkinnyRows in kernels/csrc/quant_matmul.cpp)
    return DevicePolicy(
        "cpu", 8 << 20, 64, 1024, 2048, True, False, None, False, True, int8_prefill_rows=64 if vnni else None
    )


_POLICIES = {
    "cpu": cpu_policy(cpu_has_vnni()),
    # a GPU runs a 2.6k-row chunk of a 50k vocabulary (512 MB of fp32 logits) in one launch; few chunks mean few
    # launches, and the loss's Python loop no longer sets the step's pace
    "cuda": DevicePolicy(
        "cuda", 1 << 29, 1024, 1 << 16, 8192, False, True, "reduce-overhead", True, False, False, draft_tree=True
    ),
}


_forced: DevicePolicy | None = None


@contextlib.contextmanager
def forced_policy(p: DevicePolicy) -> Iterator[None]:
    """Use `p` whatever the device: tests run the GPU policy's code paths on a CPU."""
    global _forced
    old, _forced = _forced, p
    try:
        yield
    finally:
        _forced = old


def policy(device: str | torch.device | None) -> DevicePolicy:
    """The policy of a device (a tensor's .device, a name, or None for the CPU). Unknown kinds (mps, xpu)
    get the GPU's sizes with no CUDA graphs."""
    if _forced is not None:
        return _forced
    kind = torch.device(device).type if device is not None else "cpu"
    if kind in _POLICIES:
        return _POLICIES[kind]
    gpu = _POLICIES["cuda"]
    return DevicePolicy(
        kind,
        gpu.loss_logit_bytes,
        gpu.loss_min_rows,
        gpu.loss_max_rows,
        4096,
        False,
        True,
        None,
        False,
        False,
        draft_tree=True,
    )


def loss_chunk_rows(vocab_size: int, device: str | torch.device | None = None) -> int:
    """Tokens per chunk of the linear cross-entropy: as many as fit the device's logit budget, within bounds."""
    p = policy(device)
    return max(p.loss_min_rows, min(p.loss_max_rows, p.loss_logit_bytes // 4 // vocab_size))


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (timing needs it; a CPU has none)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
