"""Training throughput: lmlab's Trainer step vs transformers' LlamaForCausalLM with the same loop.

Same weights (a ~17M-parameter LLaMA: 6 layers, hidden 384, vocab 8192), batch 8 x 256, fused
AdamW, gradient clipping; eager and torch.compile; steps interleaved so machine noise hits both;
MFU against a GEMM peak measured in the same run; peak RSS of each in its own process.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--no-compile] [--bf16] [--tune-malloc]

Rows: eager (lmlab's CPU kernels on: fused elementwise ops and the attention kernel), eager
without them, torch.compile (the attention kernel on; inductor fuses the rest), and with --bf16
both under bf16 autocast (MFU still against the fp32 peak). Both run under glibc's default malloc
unless --tune-malloc applies, to both, the setting lmlab's commands use (utils/malloc.py).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

import lmlab
from lmlab.kernels import fused
from lmlab.model.info import count_params, flops_per_token
from lmlab.train import TrainConfig, Trainer
from lmlab.utils.flops import measure_matmul_flops
from lmlab.utils.malloc import keep_freed_memory

BATCH, BLOCK = 8, 256


class Fixed:
    """The same batch every step: data loading is not what is measured."""

    def __init__(self, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (BATCH, BLOCK), generator=g)
        self.y = torch.randint(0, vocab, (BATCH, BLOCK), generator=g)
        self.block_size = BLOCK

    def get_batch(self, step: int):
        return self.x, self.y


def build_ours(cfg: lmlab.ModelConfig, compile_: bool, bf16: bool = False):
    """lmlab's Trainer step on a fixed batch."""
    torch.manual_seed(0)
    data = Fixed(cfg.vocab_size)
    tc = TrainConfig(max_steps=10**6, micro_batch_size=BATCH, block_size=BLOCK, compile=compile_, warmup_steps=0,
                     schedule="constant", out_dir=tempfile.mkdtemp(),
                     dtype="bfloat16" if bf16 else "float32")  # fmt: skip
    trainer = Trainer(lmlab.Transformer(cfg), data, tc, progress=False)
    return lambda: trainer.train_step(data.get_batch(0)), trainer.raw


def build_theirs(cfg: lmlab.ModelConfig, compile_: bool, weights: lmlab.Transformer | None = None, bf16: bool = False):
    """The same loop by hand around transformers' LlamaForCausalLM (same weights when given)."""
    from lmlab.model.hf import config_to_hf

    if weights is not None:
        with tempfile.TemporaryDirectory() as d:
            lmlab.save_pretrained(weights, None, d)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    else:
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg)))
    data, tc = Fixed(cfg.vocab_size), TrainConfig()
    theirs.train()
    model = torch.compile(theirs) if compile_ else theirs
    opt = torch.optim.AdamW(theirs.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=data.x, labels=data.x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def memory_only(which: str) -> None:
    """Peak RSS growth over 4 steps, and page faults in the last 2, one implementation per process."""
    cfg = lmlab.ModelConfig.from_preset("llama-17m")
    step = build_ours(cfg, False)[0] if which == "ours" else build_theirs(cfg, False)
    import gc

    gc.collect()
    base = _status_kb("VmRSS")  # current, not peak: building the model may have peaked higher
    step()
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # of steps after the first two
    for _ in range(2):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of
    # this (large) benchmark process would report its parent's peak
    print(faults // 2, _status_kb("VmHWM"), base)


def _status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also bf16 autocast (fast on CPUs with AMX)")
    ap.add_argument("--memory-only", choices=["ours", "theirs"])
    ap.add_argument("--tune-malloc", action="store_true", help="keep freed memory, as lmlab commands do")
    args = ap.parse_args()
    if args.tune_malloc:
        keep_freed_memory()  # for both: one process, one allocator
    if args.memory_only:
        return memory_only(args.memory_only)

    peak = measure_matmul_flops("cpu", torch.float32, n=2048, seconds=1.0)
    cfg = lmlab.ModelConfig.from_preset("llama-17m")
    flops_step = 3 * flops_per_token(cfg, BLOCK) * BATCH * BLOCK
    print(f"llama-17m: {count_params(cfg)['total'] / 1e6:.1f}M parameters, batch {BATCH} x {BLOCK}, fused AdamW; "
          f"GEMM peak {peak / 1e9:.0f} GFLOP/s fp32 ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'mode':<25}{'lmlab tok/s':>13}{'hf tok/s':>11}{'ratio':>8}{'lmlab MFU':>11}{'hf MFU':>9}")
    modes = [("eager", False, True, False), ("eager, no fused kernels", False, False, False)]
    modes += [] if args.no_compile else [("compiled", True, True, False)]
    modes += [("eager, bf16 autocast", False, True, True)] if args.bf16 else []
    for mode, compile_, kernels, bf16 in modes:
        fused.enabled = kernels  # lmlab's CPU kernels (kernels/fused.py, attention.py); transformers never uses them
        ours_step, weights = build_ours(cfg, compile_, bf16)
        theirs_step = build_theirs(cfg, compile_, weights, bf16)
        for _ in range(2):  # warm-up (and compilation)
            ours_step()
            theirs_step()
        a, b = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            ours_step()
            a.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs_step()
            b.append(time.perf_counter() - t)
        ta, tb = statistics.median(a), statistics.median(b)
        # MFU against the fp32 peak throughout, so the bf16 row shows its speed-up over it
        print(f"{mode:<25}{BATCH * BLOCK / ta:>13,.0f}{BATCH * BLOCK / tb:>11,.0f}{tb / ta:>7.2f}x"
              f"{flops_step / ta / peak:>11.0%}{flops_step / tb / peak:>9.0%}")  # fmt: skip
    fused.enabled = True
    rss, faults = {}, {}
    for which in ("ours", "theirs"):
        cmd = [sys.executable, __file__, "--memory-only", which] + ["--tune-malloc"] * args.tune_malloc
        out = subprocess.run(cmd, capture_output=True, text=True)
        faults[which], peak_kb, base_kb = map(int, out.stdout.split()[-3:])
        rss[which] = (peak_kb - base_kb) / 1024
    print(f"peak RSS growth over 4 eager steps: lmlab {rss['ours']:.0f} MB, transformers {rss['theirs']:.0f} MB")
    print(f"page faults per eager step after two: lmlab {faults['ours']:,}, transformers {faults['theirs']:,}")


if __name__ == "__main__":
    main()
