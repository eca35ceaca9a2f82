"""A DPO step and a GRPO step (generation + update): lmlab vs TRL's trainers, same model, same batch, CPU.

SmolLM2-135M-Instruct with LoRA r=16 on every projection, AdamW on the adapters, both sides in one run.
DPO: 8 `chatterbot-mismatched` pairs per step, reference log-probs precomputed on both sides (TRL's
precompute_ref_log_probs), so a step is the policy's forward, backward and update. GRPO: 2 arithmetic
prompts x 4 completions of up to 24 sampled tokens, the `answer_correct` reward, beta 0 (no reference),
loss dapo; a step is generation + scoring + update. TRL runs its own `Trainer` loop; step times come from
a callback (on_step_begin -> on_step_end), the first step (warm-up) left out. lmlab's step is split into
where its time goes.

    .venv/bin/python benchmarks/align.py [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lmlab.align.data import build_pairs, read_prompts
from lmlab.align.dpo import DPOLoss
from lmlab.align.grpo import GRPOLoss, GRPORollouts
from lmlab.align.pairs import build
from lmlab.align.reference import pair_reference
from lmlab.align.rewards import answer_correct
from lmlab.finetune.lora import LoraConfig, apply_lora
from lmlab.generate.config import GenerationConfig
from lmlab.model import load_pretrained, save_pretrained
from lmlab.train.config import TrainConfig
from lmlab.train.trainer import Trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS, PROMPTS, G, NEW, BLOCK = 8, 2, 4, 24, 128


class StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step of a transformers Trainer."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)


def _median(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _ours(base: str, tmp: Path, steps: int) -> dict[str, float]:
    model, tok = load_pretrained(base)
    apply_lora(model, LoraConfig(r=16, alpha=32, targets="all"))
    cfg = TrainConfig(out_dir=str(tmp / "dpo"), max_steps=steps, micro_batch_size=PAIRS, lr=5e-4, warmup_steps=0,
                      save_checkpoints=False, log_every=1000, block_size=BLOCK)  # fmt: skip
    data, _ = build_pairs(tok, tmp / "pairs" / "train.jsonl", BLOCK, PAIRS, seed=0)
    loss = DPOLoss(0.1)
    trainer = Trainer(model, data, cfg, loss_fn=loss, progress=False)
    pair_reference(trainer.raw, data, tmp / "ref.safetensors")
    dpo = []
    for step in range(steps):
        t = time.perf_counter()
        trainer.train_step(data.get_batch(step))
        dpo.append(time.perf_counter() - t)
    # GRPO: a step is get_batch (sampling + rewards + advantages) then the update
    model, tok = load_pretrained(base)
    apply_lora(model, LoraConfig(r=16, alpha=32, targets="all"))
    cfg = TrainConfig(out_dir=str(tmp / "grpo"), max_steps=steps, micro_batch_size=PROMPTS * G, lr=5e-4,
                      warmup_steps=0, save_checkpoints=False, log_every=1000, block_size=BLOCK)  # fmt: skip
    gen = GenerationConfig(max_new_tokens=NEW, temperature=0.8)
    loss = GRPOLoss(0.0, "dapo", max_new_tokens=NEW, temperature=0.8)
    rollouts = GRPORollouts(read_prompts(tmp / "prompts" / "train.jsonl"), tok, PROMPTS * G, completions_per_prompt=G,
                            generation=gen, reward_funcs={"answer_correct": answer_correct}, temperature=0.8,
                            metrics=loss.metrics)  # fmt: skip
    trainer = Trainer(model, rollouts, cfg, loss_fn=loss, progress=False)
    rollouts.set_policy(trainer.raw)
    gen_t, upd_t, tokens = [], [], []
    for step in range(steps):
        t = time.perf_counter()
        batch = rollouts.get_batch(step)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        gen_t.append(t1 - t)
        upd_t.append(time.perf_counter() - t1)
        tokens.append(int(batch["completion_mask"].sum()))
    return {"dpo": _median(dpo), "grpo_generate": _median(gen_t), "grpo_update": _median(upd_t),
            "grpo": _median([a + b for a, b in zip(gen_t, upd_t)]), "grpo_tokens": statistics.mean(tokens)}  # fmt: skip


def _theirs(hf_dir: str, tmp: Path, steps: int) -> dict[str, float]:
    import datasets
    import peft
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(max_steps=steps, learning_rate=5e-4, use_cpu=True, report_to=[], save_strategy="no",
                  logging_steps=1000, lr_scheduler_type="constant", dataloader_num_workers=0,
                  weight_decay=0.0, adam_beta2=0.95)  # fmt: skip
    import json

    rows = [json.loads(line) for line in (tmp / "pairs" / "train.jsonl").read_text().splitlines()]
    pairs = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                         "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                        for r in rows[: PAIRS * steps]])  # fmt: skip
    timer = StepTimer()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp / "trl-dpo"), per_device_train_batch_size=PAIRS, beta=0.1,
                     precompute_ref_log_probs=True, max_length=BLOCK, **common)  # fmt: skip
    DPOTrainer(model, args=args, train_dataset=pairs, processing_class=tok, peft_config=lora,
               callbacks=[timer]).train()  # fmt: skip
    dpo = _median(timer.times)
    prompts = [json.loads(line) for line in (tmp / "prompts" / "train.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
                                     for p in prompts[: PROMPTS * steps * 2]])  # fmt: skip

    def reward(completions, answer, **kw):
        return answer_correct([c[0]["content"] for c in completions], answer=answer)

    timer = StepTimer()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp / "trl-grpo"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=NEW, temperature=0.8, beta=0.0, loss_type="dapo", **common)  # fmt: skip
    GRPOTrainer(model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                callbacks=[timer]).train()  # fmt: skip
    return {"dpo": dpo, "grpo": _median(timer.times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, tok = load_pretrained("smollm2-135m-instruct")
        save_pretrained(model, tok, tmp / "hf")
        del model
        sizes = {"train": 64, "validation": 1}
        build("chatterbot-mismatched", tmp / "pairs", "pairs", sizes, where={"lang": "en"})
        build("arithmetic-easy", tmp / "prompts", "prompts", sizes)
        ours = _ours(str(tmp / "hf"), tmp, args.steps)
        theirs = _theirs(str(tmp / "hf"), tmp, args.steps)
    print(f"threads {torch.get_num_threads()}; median step seconds over {args.steps - 1} steps (first left out)")
    print(f"DPO  (8 pairs, LoRA r16, cached reference): lmlab {ours['dpo']:.2f}s  TRL {theirs['dpo']:.2f}s  "
          f"-> {theirs['dpo'] / ours['dpo']:.2f}x")  # fmt: skip
    print(f"GRPO (2 prompts x {G}, <= {NEW} new tokens): lmlab {ours['grpo']:.2f}s  TRL {theirs['grpo']:.2f}s  "
          f"-> {theirs['grpo'] / ours['grpo']:.2f}x")  # fmt: skip
    print(f"  lmlab GRPO step: generation + rewards {ours['grpo_generate']:.2f}s, update {ours['grpo_update']:.2f}s; "
          f"{ours['grpo_tokens']:.0f} completion tokens per step")  # fmt: skip


if __name__ == "__main__":
    main()
