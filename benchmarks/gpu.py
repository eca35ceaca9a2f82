"""lmlab on a GPU, in one run: parity with transformers, training and decoding speed side by side, and
the real commands on CUDA. Exits non-zero if any check fails.

    PYTHONPATH=src python benchmarks/gpu.py                 # on a CUDA machine, < 6 minutes on one H200
    PYTHONPATH=src python benchmarks/gpu.py --device cpu    # the same script, tiny shapes: a dry run

Needs only a stock PyTorch GPU image with transformers plus lmlab's pure-Python dependencies (nothing
is downloaded: models are random, data is the repo's data/samples). Sections:
1. parity: logits (fp32, bf16) of GPT-2 124M and SmolLM2's shape against transformers on the same
   weights; greedy and 4-beam outputs token for token;
2. training: one optimizer step (bf16 autocast, fused AdamW, clipping), lmlab's Trainer against the same
   loop around transformers, eager and torch.compile, with MFU against a measured 8192^3 bf16 matmul;
3. decoding: tokens/s at batch 1 and 32, lmlab eager and compiled (CUDA graphs) against transformers'
   generate;
4. commands: data tokenize, pretrain, finetune (LoRA SFT), eval, generate, serve (one request).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lmlab  # noqa: E402
from lmlab.train.flops import StepCounts, step_flops  # noqa: E402
from lmlab.utils.device import default_device, synchronize  # noqa: E402
from lmlab.utils.flops import measure_matmul_flops  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/INFO, detail)


def record(name: str, ok: bool | None, detail: str) -> None:
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((name, status, detail))
    print(f"[{status}] {name}: {detail}", flush=True)


def check(name: str) -> Callable:
    """Run a section; an exception is a failed check with its last lines, not the end of the run."""

    def wrap(fn: Callable) -> Callable:
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # a broken section must not hide the others' results
                record(name, False, f"{type(e).__name__}: {e}")
                traceback.print_exc(limit=4)
                return None

        return run

    return wrap


class Shapes:
    """Sizes for a GPU run, or tiny ones for the CPU dry run."""

    def __init__(self, device: torch.device, small: bool) -> None:
        self.small = small
        if small:
            self.gpt2 = lmlab.ModelConfig.from_preset("gpt2-tiny")
            self.smol = lmlab.ModelConfig.from_preset("llama-tiny")
            self.train_batch, self.train_block, self.steps = 2, 64, 2
            self.decode_batches, self.new_tokens = (1, 4), 8
        else:
            self.gpt2 = lmlab.ModelConfig.from_preset("gpt2-small")
            self.smol = lmlab.ModelConfig.from_preset("smollm2-135m")
            self.train_batch, self.train_block, self.steps = 16, 1024, 10
            self.decode_batches, self.new_tokens = (1, 32), 128


def hf_copy(model: lmlab.Transformer, dtype: torch.dtype, device: torch.device):
    """transformers' model with the same weights (written by lmlab, read by from_pretrained)."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        lmlab.save_pretrained(model, None, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    return theirs.to(device)


def ours_model(cfg: lmlab.ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return lmlab.Transformer(cfg).to(device=device, dtype=dtype)


# -- 1. parity -------------------------------------------------------------------------------------
@check("parity")
def parity(shapes: Shapes, device: torch.device) -> None:
    from lmlab.generate import GenerationConfig, generate_ids

    for name, cfg in (("gpt2", shapes.gpt2), ("smollm2-shape", shapes.smol)):
        ours = ours_model(cfg, device).eval()
        theirs = hf_copy(ours, torch.float32, device).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            diff = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
            record(f"logits fp32 {name}", diff <= 1e-3, f"max |diff| {diff:.2e} (<= 1e-3)")
            a, b = ours.to(torch.bfloat16)(ids).float(), theirs.to(torch.bfloat16)(ids).logits.float()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            record(f"logits bf16 {name}", agree >= 0.97, f"argmax agreement {agree:.1%}, max |diff| "
                   f"{(a - b).abs().max().item():.3f}")  # fmt: skip
        ours, theirs = ours.float(), theirs.float()
        prompt = ids[:1, :16]
        n = min(32, shapes.new_tokens * 4)
        with torch.no_grad():
            g_ours = generate_ids(ours, prompt, torch.ones_like(prompt), GenerationConfig(max_new_tokens=n))
            g_theirs = theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            record(f"greedy {name}", torch.equal(g_ours[0, : g_theirs.shape[1]].cpu(), g_theirs[0].cpu()),
                   f"{n} tokens, token for token")  # fmt: skip
            cfg_beam = GenerationConfig(max_new_tokens=n, num_beams=4, length_penalty=1.0)
            b_ours = generate_ids(ours, prompt, torch.ones_like(prompt), cfg_beam)
            b_theirs = theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, num_beams=4, do_sample=False,
                                       early_stopping=False, pad_token_id=0)  # fmt: skip
            same = torch.equal(b_ours[0, : b_theirs.shape[1]].cpu(), b_theirs[0].cpu())
            record(f"beam-4 {name}", same, f"{n} tokens, token for token")
        del ours, theirs


# -- 2. training -----------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable], steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so machine noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@check("training")
def training(shapes: Shapes, device: torch.device, compile_modes: list[bool]) -> None:
    bf16 = device.type == "cuda"
    peak = measure_matmul_flops(device, torch.bfloat16 if bf16 else torch.float32)
    record("matmul peak", None, f"{peak / 1e12:.1f} TFLOP/s ({'bf16' if bf16 else 'fp32'})")
    goals = {("gpt2", False): 1.3, ("gpt2", True): 1.15, ("smollm2-shape", False): 1.2}
    for name, cfg in (("gpt2", shapes.gpt2), ("smollm2-shape", shapes.smol)):
        for compiled in compile_modes:
            if name == "smollm2-shape" and compiled:
                continue
            t, flops = _train_pair(cfg, shapes, device, compiled, bf16)
            B, T = shapes.train_batch, shapes.train_block
            ratio = t["hf"] / t["lmlab"]
            goal = goals[(name, compiled)]
            mode = "compiled" if compiled else "eager"
            detail = (f"{B * T / t['lmlab']:,.0f} vs {B * T / t['hf']:,.0f} tok/s = {ratio:.2f}x (goal {goal}x); "
                      f"MFU {flops / t['lmlab'] / peak:.0%} vs {flops / t['hf'] / peak:.0%}")  # fmt: skip
            record(f"train step {name} {mode}", ratio >= goal if not shapes.small else None, detail)
            if compiled and name == "gpt2" and not shapes.small:
                mfu = flops / t["lmlab"] / peak
                record("train compiled MFU gpt2", mfu >= 0.5, f"{mfu:.0%} (goal 50%)")
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _train_pair(cfg, shapes: Shapes, device: torch.device, compiled: bool, bf16: bool) -> tuple[dict, int]:
    """Median step times of lmlab's Trainer and the same loop around transformers, and the step's FLOPs."""
    from lmlab.train import TrainConfig, Trainer

    B, T = shapes.train_batch, shapes.train_block
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tc = TrainConfig(max_steps=10**6, micro_batch_size=B, block_size=T, compile=compiled, warmup_steps=0,
                     schedule="constant", out_dir=tempfile.mkdtemp(), device=str(device),
                     dtype="bfloat16" if bf16 else "float32")  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(lmlab.Transformer(cfg), None, tc, progress=False)
    theirs = hf_copy(trainer.raw, torch.float32, device).train()
    hf_model = torch.compile(theirs) if compiled else theirs
    opt = torch.optim.AdamW(theirs.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, fused=True)
    xd = x.to(device)

    def hf_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf_model(input_ids=xd, labels=xd).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def our_step():
        trainer.train_step((x, y))

    for _ in range(2):  # warm-up and compilation
        our_step()
        hf_step()
    t = time_interleaved({"lmlab": our_step, "hf": hf_step}, shapes.steps, device)
    return t, step_flops(trainer.raw, StepCounts(B * T, B * T * (T + 1) // 2, B * T))


# -- 3. decoding -----------------------------------------------------------------------------------
@check("decoding")
def decoding(shapes: Shapes, device: torch.device, compile_modes: list[bool]) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = ours_model(shapes.smol, device, dtype).eval()
    theirs = hf_copy(ours.float(), dtype, device).eval()
    ours = ours.to(dtype)
    for batch in shapes.decode_batches:
        t = _decode_times(ours, theirs, shapes, device, batch, compile_modes)
        n = shapes.new_tokens
        for k in t:
            if k == "hf":
                continue
            ratio = t["hf"] / t[k]
            goal_applies = "compiled" in k and not shapes.small
            record(f"decode batch {batch} {k}", ratio >= 1.5 if goal_applies else None,
                   f"{batch * n / t[k]:,.0f} vs {batch * n / t['hf']:,.0f} tok/s = {ratio:.2f}x"
                   + (" (goal 1.5x)" if goal_applies else ""))  # fmt: skip


def _decode_times(ours, theirs, shapes: Shapes, device: torch.device, batch: int, compile_modes: list[bool]) -> dict:
    from lmlab.generate import GenerationConfig, generate_ids

    n = shapes.new_tokens
    prompt = torch.randint(3, shapes.smol.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(2))
    prompt = prompt.to(device)
    mask = torch.ones_like(prompt)
    fns = {}
    for compiled in compile_modes:
        cfg = GenerationConfig(max_new_tokens=n, compile=compiled)
        fns[f"lmlab {'compiled' if compiled else 'eager'}"] = lambda cfg=cfg: generate_ids(ours, prompt, mask, cfg)
    fns["hf"] = lambda: theirs.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        for fn in fns.values():  # warm-up and compilation
            fn()
        return time_interleaved(fns, 3, device)


@check("chat turns with kept caches")
def kept_turns(device: torch.device, compile_modes: list[bool]) -> None:
    """Three turns of speculative rounds (an EAGLE draft) over one PromptCache, compiled where the run
    compiles (on a GPU: CUDA graphs over each answer's own static caches, which the PromptCache then
    holds): every turn's tokens equal plain greedy decoding's, and turns after the first adopt the
    draft's kept state."""
    from lmlab.compress.eagle import eagle_draft
    from lmlab.generate import GenerationConfig, decode
    from lmlab.generate.kv_cache import PromptCache
    from lmlab.generate.speculative import SpeculativeStats, speculative_rounds

    target = ours_model(lmlab.ModelConfig.from_preset("llama-tiny"), device).eval()
    torch.manual_seed(1)
    draft = eagle_draft(target).to(device).eval()
    past, prompt, ok = (
        PromptCache(),
        torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(5)).tolist(),
        True,
    )
    cfg = GenerationConfig(max_new_tokens=16, compile=True in compile_modes)
    for turn in range(3):
        want = decode.generate(target, None, prompt, cfg.replace(compile=False))[0].token_ids
        had = past.draft is not None
        got = [t for new in speculative_rounds(target, draft, None, prompt, cfg, 3, 0.0, SpeculativeStats(), past)
               for t in new]  # fmt: skip
        ok &= got == want and had == (turn > 0) and past.ids == prompt + got[:-1]
        prompt = prompt + got + [7, 8, 9]
    record("chat turns with kept caches", ok, f"3 turns, {'compiled' if cfg.compile else 'eager'}: "
           + ("tokens equal plain greedy, draft state adopted" if ok else "tokens or kept state differ"))  # fmt: skip


@check("candidate-tree rounds")
def tree_rounds(device: torch.device, compile_modes: list[bool]) -> None:
    """Greedy speculative rounds over the device policy's default candidate tree (a GPU's: generate/
    draft_tree.py), compiled where the run compiles: an EAGLE draft's and the target as its own draft's
    tokens equal plain greedy decoding's, every round checked 6 candidates, and the self-draft's rounds
    accepted whole paths; a dynamic tree's tokens too; sampled tree rounds repeat with their seed. Printed:
    a tree round's time over a chain round's (self-draft: 4 and 5 tokens)."""
    from lmlab.compress.eagle import eagle_draft
    from lmlab.generate import GenerationConfig, decode
    from lmlab.generate.draft_tree import DEFAULT_TREE
    from lmlab.generate.speculative import speculative_generate

    target = ours_model(lmlab.ModelConfig.from_preset("llama-tiny"), device).eval()
    torch.manual_seed(1)
    draft = eagle_draft(target).to(device).eval()
    prompt = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    cfg = GenerationConfig(max_new_tokens=24, compile=True in compile_modes, stop_token_ids=[])
    want = decode.generate(target, None, prompt, cfg.replace(compile=False))[0].token_ids
    ok, seconds = True, {}
    for name, d in (("eagle", draft), ("self", target)):
        for tree in (DEFAULT_TREE, None):
            # confidence 0: the chain drafts all 4 tokens every round (a random model's guesses are unsure)
            speculative_generate(target, d, None, prompt, cfg, 4, 0.0, tree=tree)  # compiles
            synchronize(device)
            t = time.perf_counter()
            got, st = speculative_generate(target, d, None, prompt, cfg, 4, 0.0, tree=tree)
            synchronize(device)
            seconds[name, tree] = (time.perf_counter() - t) / st.rounds
            ok &= got.token_ids == want
            if tree is not None:
                ok &= st.proposed == 6 * st.rounds and (name != "self" or st.accepted == st.generated - st.rounds)
    # a dynamic tree (EAGLE-2: greedy), and sampled rounds over the default tree (reproducible by seed)
    got, st = speculative_generate(target, draft, None, prompt, cfg, tree="dynamic")
    ok &= got.token_ids == want and st.proposed == 6 * st.rounds
    sampled = cfg.replace(temperature=0.8, top_p=0.95, seed=3)
    runs = [speculative_generate(target, draft, None, prompt, sampled, tree=DEFAULT_TREE) for _ in range(2)]
    ok &= runs[0][0].token_ids == runs[1][0].token_ids and runs[0][1].proposed == 6 * runs[0][1].rounds
    ratio = seconds["self", DEFAULT_TREE] / seconds["self", None]
    record("candidate-tree rounds", ok, f"{'compiled' if cfg.compile else 'eager'}: "
           + ("tokens equal plain greedy (static and dynamic trees), sampled rounds reproducible" if ok
              else "tokens or rounds differ")
           + f"; a tree round takes {ratio:.2f}x a chain round (one-off)")  # fmt: skip


# -- 4. the real commands --------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def lmlab_cmd(args: list[str], device: torch.device, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LMLAB_DEVICE": str(device)}
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def run_command(name: str, args: list[str], device: torch.device, expect: str = "") -> bool:
    t = time.perf_counter()
    r = lmlab_cmd(args, device)
    ok = r.returncode == 0 and expect in r.stdout + r.stderr
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
    record(f"command {name}", ok, f"{time.perf_counter() - t:.0f} s" + ("" if ok else f": {tail[0][:200]}"))
    return ok


@check("commands")
def commands(device: torch.device, work: Path) -> None:
    from lmlab.tokenizer.train import train_tokenizer_files

    sample = ROOT / "data" / "samples" / "sample.jsonl"
    tok = train_tokenizer_files([sample], 1000, work / "tokenizer", progress=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save(work / "tokenizer")
    run_command("data tokenize", ["data", "tokenize", "--input", str(sample), "--tokenizer", str(work / "tokenizer"),
                                  "--out", str(work / "tokens"), "--val-fraction", "0.1"], device)  # fmt: skip
    import yaml

    pre = {
        "model": {"preset": "llama-tiny"},
        "data": {"tokens": str(work / "tokens")},
        "train": {"out_dir": str(work / "pre"), "max_steps": 20, "block_size": 64, "eval_every": 10,
                  "dtype": "bfloat16" if device.type == "cuda" else "float32"},
    }  # fmt: skip
    (work / "pretrain.yaml").write_text(yaml.safe_dump(pre))
    if not run_command("pretrain", ["pretrain", "--config", str(work / "pretrain.yaml")], device,
                       expect="best validation loss"):  # fmt: skip
        return
    base = work / "pre" / "final"
    convs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(48)]  # fmt: skip
    (work / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    from lmlab.tokenizer import load_tokenizer

    t = load_tokenizer(base)
    t.chat_template = CHAT_TEMPLATE
    t.save(base)
    recipe = {
        "model": {"init_from": str(base)},
        "finetune": {"task": "sft", "method": "lora", "lora": {"r": 4, "targets": ["q", "v"]}},
        "data": {"train": str(work / "chat.jsonl"), "validation": str(work / "chat.jsonl")},
        "train": {"out_dir": str(work / "ft"), "block_size": 64, "micro_batch_size": 4, "max_steps": 8,
                  "warmup_steps": 1, "eval_every": 4, "eval_batches": 2,
                  "dtype": "bfloat16" if device.type == "cuda" else "float32"},
    }  # fmt: skip
    (work / "sft.yaml").write_text(yaml.safe_dump(recipe))
    run_command("finetune (LoRA SFT)", ["finetune", "--config", str(work / "sft.yaml")], device)
    text = work / "text.txt"
    text.write_text(" ".join(json.loads(line)["text"] for line in sample.read_text().splitlines()[:20]))
    run_command("eval", ["eval", "--model", str(base), "--tasks", "ppl", "--data", str(text), "--max-length", "64",
                         "--out", str(work / "eval")], device)  # fmt: skip
    run_command(
        "generate", ["generate", "--model", str(base), "--prompt", "In the beginning", "--max-new-tokens", "16"], device
    )
    run_command("generate --compile", ["generate", "--model", str(base), "--prompt", "In the beginning",
                                       "--max-new-tokens", "16", "--compile"], device)  # fmt: skip
    serve_once(base, device)


def serve_once(model: Path, device: torch.device) -> None:
    """`lmlab serve` on the device, one chat completion through the openai client (plain HTTP without it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LMLAB_DEVICE": str(device)}
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "serve", "--model", str(model), "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    try:
        import urllib.request

        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {proc.stdout.read()[-500:]}") from None
                time.sleep(0.5)
        body = {"model": str(model), "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        try:
            import openai

            reply = openai.OpenAI(base_url=url + "/v1", api_key="unused").chat.completions.create(**body)
            text, how = reply.choices[0].message.content, "openai client"
        except ImportError:
            req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            text = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"]["content"]
            how = "plain HTTP (no openai package here)"
        record("command serve", isinstance(text, str), f"{time.perf_counter() - t:.0f} s, one reply via {how}")
    except Exception as e:
        record("command serve", False, f"{type(e).__name__}: {e}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when there) or cpu for a dry run")
    ap.add_argument("--small", action="store_true", help="tiny shapes (implied on a CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--only", nargs="*", choices=["parity", "training", "decoding", "commands"])
    args = ap.parse_args()
    device = default_device(args.device)
    shapes = Shapes(device, args.small or device.type != "cuda")
    compile_modes = [False] if args.no_compile else [False, True]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"lmlab GPU benchmark on {device} ({name}), torch {torch.__version__}, "
          f"{'tiny shapes (dry run)' if shapes.small else 'full shapes'}")  # fmt: skip
    start = time.perf_counter()
    only = set(args.only or ["parity", "training", "decoding", "commands"])
    if "parity" in only:
        parity(shapes, device)
    if "training" in only:
        training(shapes, device, compile_modes)
    if "decoding" in only:
        decoding(shapes, device, compile_modes)
        kept_turns(device, compile_modes)
        tree_rounds(device, compile_modes)
    if "commands" in only:
        with tempfile.TemporaryDirectory() as work:
            commands(device, Path(work))
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - start:.0f} s")
    for n, s, d in RESULTS:
        print(f"  {s:4}  {n:<34} {d}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
