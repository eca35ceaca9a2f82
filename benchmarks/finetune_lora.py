"""LoRA SFT step: lmlab vs transformers + peft on SmolLM2-135M-Instruct, same weights, same batch.

A packed batch of chatterbot conversations (8 x 256 tokens, loss on assistant tokens only), LoRA
r=16 on every projection, AdamW on the adapter; steps interleaved so machine noise hits both. The
peft side gets the same packed rows with the usual padded-batch mask (transformers' own packing
path needs flash attention), and computes logits for every position as `Trainer` does.

    .venv/bin/python benchmarks/finetune_lora.py [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import peft
import torch
import transformers

from lmlab.data import fetch
from lmlab.finetune.lora import LoraConfig, apply_lora
from lmlab.finetune.sft import build_sft_data, sft_loss
from lmlab.model import load_pretrained, save_pretrained

BATCH, BLOCK = 8, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, tok = load_pretrained("smollm2-135m-instruct")
    data, _ = build_sft_data(tok, fetch("chatterbot") / "train.jsonl", BLOCK, BATCH, seed=0)
    batch = data.get_batch(0)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, tok, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    apply_lora(ours, LoraConfig(r=16, alpha=32, targets="all"))
    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4, fused=True)
    labels = batch["labels"].clone()
    labels[:, 0] = -100

    def step_ours():
        loss = sft_loss(ours, batch)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        out = theirs(input_ids=batch["input_ids"], labels=labels)
        out.loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    times = {"lmlab": [], "peft": []}
    for i in range(args.steps + 1):  # the first step of each warms up
        for name, fn in (("lmlab", step_ours), ("peft", step_theirs)):
            t = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t)
    tokens = BATCH * BLOCK
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M LoRA r=16 (all projections), batch {BATCH} x {BLOCK}, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:<6} {v:6.2f} s/step  {tokens / v:7.0f} tokens/s")
    print(f"  speed ratio lmlab / peft: {med['peft'] / med['lmlab']:.2f}x")


if __name__ == "__main__":
    main()
