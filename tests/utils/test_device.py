"""The one device rule and the device policy (what differs between a CPU and a GPU), tested without a GPU."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.utils.device import cpu_has_vnni, cpu_policy, default_device, forced_policy, loss_chunk_rows, policy

SRC = Path(__file__).resolve().parents[2] / "src" / "lmlab"


def test_default_device_rule(monkeypatch):
    monkeypatch.delenv("LMLAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device(None).type == expected and default_device("auto").type == expected
    assert default_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    assert default_device(None) == torch.device("cpu")
    with pytest.raises(LmlabError, match="device"):
        default_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(LmlabError, match="no GPU"):
            default_device("cuda")


def test_policy_never_lets_a_cpu_constant_reach_a_gpu():
    cpu, gpu = policy("cpu"), policy("cuda:0")
    assert cpu.cpu_kernels and not gpu.cpu_kernels
    assert cpu.sync_every_step and not gpu.sync_every_step
    assert not cpu.trace_loss and gpu.trace_loss
    assert cpu.decode_compile_mode is None and gpu.decode_compile_mode == "reduce-overhead"
    assert gpu.peak_matmul_n >= 4 * cpu.peak_matmul_n
    # a 50k vocabulary: ~40 rows per 8 MB chunk on a CPU (raised to 64), 2.6k rows on a GPU
    assert loss_chunk_rows(50_304, "cpu") == 64 and loss_chunk_rows(50_304, "cuda") == 2668
    mps = policy("mps")  # other accelerators: the GPU's sizes, no CUDA graphs, no CPU kernels
    assert not mps.cpu_kernels and mps.decode_compile_mode is None
    # integer activations (W8A8, int16): a VNNI CPU's prefill only (where they were measured)
    assert cpu.int8_prefill_rows == (64 if cpu_has_vnni() else None)
    assert gpu.int8_prefill_rows is None and mps.int8_prefill_rows is None
    with forced_policy(gpu):
        assert policy("cpu") is gpu
    assert policy("cpu") is cpu


def test_integer_activations_need_vnni(tmp_path):
    """The CPU policy grants integer activations only where /proc/cpuinfo lists VNNI (AVX-512 or AVX)."""
    for flags, want in (
        ("fpu avx512f avx512_vnni", True),
        ("fpu avx2 avx_vnni", True),
        ("fpu avx512f avx512bw", False),
    ):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_vnni(str(info)) is want
        assert cpu_policy(want).int8_prefill_rows == (64 if want else None)
    assert cpu_policy(False) == dataclasses.replace(cpu_policy(True), int8_prefill_rows=None)  # nothing else differs


@pytest.mark.parametrize("module", ["cli.py", "serve/server.py", "eval/harness.py"])
def test_commands_load_models_on_the_rule_s_device(module):
    """Every command that loads a model for inference names the device the rule chose (training loads
    on the host and the Trainer moves the model; merge and convert stay on the host by design)."""
    host_only = {"_convert", "_merge", "_model_info"}
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "load_pretrained"]
    owner = {id(c): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for c in ast.walk(f)}
    checked = [c for c in calls if owner.get(id(c)) not in host_only]
    assert checked
    for c in checked:
        assert any(k.arg == "device" for k in c.keywords), f"{module}:{c.lineno} load_pretrained without device="
