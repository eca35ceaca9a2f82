"""Quantization: quality and decode speed of SmolLM2-135M-Instruct at fp32, int8, int4 (RTN, GPTQ)
and GGUF blocks, beside llama.cpp on the same GGUF files.

Quality (--ppl): perplexity on the KJV and Python-docs test splits (the first --ppl-chars characters
of each). The packaged SmolLM2 is itself a Q4_1 GGUF (the only real decoder weights that install
offline), so its "fp32" weights already sit on a 4-bit grid of groups of 32: int4 with groups of 32
and offsets would reproduce them exactly. The int4 rows therefore use groups of 64 (128, GPTQ's usual
setting, does not divide SmolLM2's width of 576), where rounding is real; the gap GPTQ closes is
measured there.

Speed (--speed): decode tokens/s at batch 1 and 8 (128 new tokens, greedy, EOS off), eager and
compiled, counted after the first new token as llama.cpp's figure is ("with prompt": the compiled
run's whole time, the chat prompt's forward included), and prefill of 512 and of 40 tokens, with the weight
bytes each step streams, GB/s and its share of the machine's read bandwidth (the bound); llama.cpp
(node-llama-cpp, 2 threads) on the GGUF files where the test set-up installed it. Each llama.cpp
run alternates with one of lmlab's compiled batch-1 runs and one of its 512-token prefills, and the
median of --repeats is taken (a shared machine drifts by 30% within minutes, so sequential blocks
would compare different machines).

    .venv/bin/python benchmarks/quantize.py [--ppl [--mmlu 500]] [--speed] [--act-error] [--ppl-chars 60000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.compress.gptq import calibration_batches
from lmlab.compress.quantize import calibration_texts, quantize_model
from lmlab.eval.harness import load_texts
from lmlab.eval.perplexity import perplexity
from lmlab.generate import GenerationConfig
from lmlab.generate.decode import decode_steps, left_pad, new_state
from lmlab.model.checkpoint import load_pretrained
from lmlab.model.quantized import QuantConfig, quantized_bytes
from lmlab.utils.packaged import packaged_path

MODEL = "smollm2-135m-instruct"
CALIB = "kjv,python-docs"  # GPTQ's calibration: train splits, an equal share of each (the test splits are scored)


def variants(gptq_samples: int, out: Path | None = None) -> dict[str, object]:
    """name -> a function returning the model (built when needed: each holds its own weights)."""

    def rtn(cfg: QuantConfig):
        def build():
            m, _ = load_pretrained(MODEL)
            quantize_model(m, cfg)
            return m

        return build

    def gptq(cfg: QuantConfig):
        def build():
            m, tok = load_pretrained(MODEL)
            texts = calibration_texts(CALIB, gptq_samples * 512 * 8)
            quantize_model(m, cfg, calibration_batches(tok, texts, gptq_samples, 512))
            return m

        return build

    return {
        "fp32": lambda: load_pretrained(MODEL)[0],
        "int8 (per channel)": rtn(QuantConfig(bits=8)),  # the default: int24 activations in a long prefill
        "int8 pc, float32 act": rtn(QuantConfig(bits=8, activations="float32")),  # weight-only
        "int8 pc, int8 act": rtn(QuantConfig(bits=8, activations="int8")),  # W8A8 dynamic
        "int8 pc, int16 act": rtn(QuantConfig(bits=8, activations="int16")),  # prefill in two int8 limbs
        "int4 RTN g64": rtn(QuantConfig(bits=4, group_size=64, sym=False)),
        "int4 GPTQ g64": gptq(QuantConfig(bits=4, group_size=64, sym=False, method="gptq")),
        "int4 GPTQ g64 act-order": gptq(QuantConfig(bits=4, group_size=64, sym=False, method="gptq", desc_act=True)),
        "int4 RTN g32 sym": rtn(QuantConfig(bits=4, group_size=32, sym=True)),
        "GGUF Q4_1 as stored": lambda: load_pretrained(MODEL, dequantize=False)[0],
        **(
            {
                "GGUF Q8_0 export": lambda: load_pretrained(gguf_files(out)["Q8_0"], dequantize=False)[0],
                "GGUF Q4_0 export": lambda: load_pretrained(gguf_files(out)["Q4_0"], dequantize=False)[0],
            }
            if out is not None
            else {}
        ),
    }


def quality(args: argparse.Namespace) -> None:
    _, tok = load_pretrained(MODEL)
    sets = {}
    for name in ("kjv", "python-docs"):
        text, n = [], 0
        for t in load_texts(name, "test"):
            text.append(t)
            n += len(t)
            if n >= args.ppl_chars:
                break
        sets[name] = text
    mmlu = None
    if args.mmlu:
        from lmlab.eval.harness import run_multiple_choice, task_docs
        from lmlab.eval.tasks import load_task

        task = load_task("mmlu")
        mmlu = (task, task_docs(task, task.split, args.mmlu))  # lmlab eval's seeded sample: the same questions
    print(f"perplexity, first {args.ppl_chars:,} characters of each test split, windows of 512, stride 256"
          + (f"; MMLU: {args.mmlu} questions, 0-shot, acc ± SE" if mmlu else ""))  # fmt: skip
    print(f"{'model':<22}{'MB':>8}" + "".join(f"{n:>14}{'vs fp32':>9}" for n in sets) + ("   MMLU" if mmlu else ""))
    base = {}
    for name, build in variants(args.gptq_samples, Path(args.out)).items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        model = build()
        made = time.perf_counter() - t
        row = f"{name:<22}{quantized_bytes(model) / 1e6:>8.0f}"
        for data, texts in sets.items():
            with torch.inference_mode():
                ppl = perplexity(model, tok, texts, max_length=512, stride=256)["perplexity"]
            base.setdefault(data, ppl)  # the first row (fp32 unless --only leaves it out)
            row += f"{ppl:>14.3f}{ppl / base[data] - 1:>+9.2%}"
        if mmlu:
            with torch.inference_mode():
                r = run_multiple_choice(model, tok, mmlu[0], mmlu[1], batch_size=8)
            row += f"   {r['acc']:.3f} ± {r['acc_se']:.3f}"
        print(row + (f"   (built in {made:.0f} s)" if made > 5 else ""), flush=True)
        del model


def gguf_files(out: Path) -> dict[str, Path]:
    """SmolLM2 as GGUF: the packaged Q4_1 file, and F32/Q8_0/Q4_0 exports of its float32 weights."""
    from lmlab.compress.gguf_export import export_gguf

    files = {"Q4_1": Path(packaged_path(MODEL))}
    model, tok = load_pretrained(MODEL)
    for quant in ("f32", "q8_0", "q4_0"):
        path = out / f"smollm2-{quant}.gguf"
        if not path.exists():
            export_gguf(model, tok, path, quant)
        files[quant.upper()] = path
    return files


def llamacpp_speed(path: Path, prompt: list[int], long_prompt: list[int], n: int, repeats: int, threads: int):
    """(decode tok/s, prefill tok/s) of llama.cpp on one GGUF file; None where it is not installed."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.llamacpp import run_llamacpp
    except ImportError:
        return None
    try:
        decode, prefill = run_llamacpp(path.resolve(), [
            {"mode": "speed", "prompt": prompt, "n": n, "repeats": repeats},
            {"mode": "speed", "prompt": long_prompt, "n": 2, "repeats": repeats},
        ], threads=threads)["results"]  # fmt: skip
    except BaseException as e:  # pytest.fail raises outside BaseException's Exception branch
        print(f"  (llama.cpp not run: {str(e).splitlines()[0][:120]})")
        return None
    return (n - 1) / statistics.median(decode["decode_s"]), len(long_prompt) / statistics.median(prefill["prefill_s"])


def prefill_seconds(model, ids: torch.Tensor) -> float:
    """One forward over the prompt `ids` (the last position's logits only)."""
    start = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def timed_decode(
    model, ids: torch.Tensor, mask: torch.Tensor, cfg: GenerationConfig, pad_id: int
) -> tuple[float, float]:
    """(seconds after the first new token, seconds in all) of one generation: the decode rate counts the
    steps after the first token, as llama.cpp's does (the prompt's forward and the first token apart)."""
    state = new_state(ids, mask, cfg)
    start = time.perf_counter()
    first = None
    for _ in decode_steps(model, state, cfg, eos=[], pad_id=pad_id):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return end - first, end - start


def speed(args: argparse.Namespace) -> None:
    _, tok = load_pretrained(MODEL)
    files = gguf_files(Path(args.out))
    builds = variants(args.gptq_samples)
    rows = {  # name -> (lmlab model builder, the GGUF file llama.cpp runs beside it)
        "fp32 / F32": (builds["fp32"], files["F32"]),
        # the default (int24 activations in a prefill on a VNNI CPU) beside llama.cpp's Q8_0
        "int8 per channel": (builds["int8 (per channel)"], files["Q8_0"]),
        "int8 pc, float32 act": (builds["int8 pc, float32 act"], None),
        # W8A8 dynamic (lmlab quantize --activations int8): its prefill beside llama.cpp's Q8_0, which
        # also rounds activations to 8 bits
        "int8 pc, int8 act": (builds["int8 pc, int8 act"], files["Q8_0"]),
        "int8 pc, int16 act": (builds["int8 pc, int16 act"], files["Q8_0"]),
        "GGUF Q8_0 (blocks)": (lambda: load_pretrained(files["Q8_0"], dequantize=False)[0], files["Q8_0"]),
        "GGUF Q4_0 (blocks)": (lambda: load_pretrained(files["Q4_0"], dequantize=False)[0], files["Q4_0"]),
        "GGUF Q4_1 (blocks)": (lambda: load_pretrained(files["Q4_1"], dequantize=False)[0], files["Q4_1"]),
    }
    prompts = ["Write a short story about a robot.", "中国的四大发明是什么？", "List five colors.", "What is 2+2?"] * 2
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts]  # fmt: skip
    long_prompt = tok.encode(" ".join(load_texts("kjv", "test")[:200]))[:512]
    threads = torch.get_num_threads()
    sys.path.insert(0, str(Path(__file__).parent))
    from generate import bandwidth_gbs  # benchmarks/generate.py: one full read of a large tensor

    probe = torch.ones(1024 * 1024 * 1024 // 4)  # 1 GB: no cache holds it
    print(f"{threads} threads (llama.cpp too); {args.new_tokens} new tokens; median of {args.repeats}; "
          "MB/step: weight bytes one decode step streams; bound: GB/s over the read bandwidth, sampled "
          "before each row")  # fmt: skip
    print(f"{'model':<20}{'MB/step':>8}{'batch':>6}{'eager':>8}{'compiled':>10}{'GB/s':>6}{'bound':>6}{'prefill 512':>12}"
          f"{'llama.cpp':>11}{'its prefill':>12}{'ours/llama.cpp':>16}{'with prompt':>13}{'prefill 40':>11}"
          f"{'prefill ours/llama.cpp':>24}")  # fmt: skip
    for name, (build, gguf) in rows.items():
        if args.only and name not in args.only:
            continue
        model = build()
        read = bandwidth_gbs(probe)
        nbytes = quantized_bytes(model)
        tied = type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.embed.weight
        if not tied:
            nbytes -= model.embed.weight.numel() * model.embed.weight.element_size()  # a lookup reads one row
        refs = []  # llama.cpp (3 runs in one process, their median) alternates with lmlab's compiled batch-1 runs
        with torch.inference_mode():
            pre = torch.tensor([long_prompt])
            model(pre[:, :64])
            t = [prefill_seconds(model, pre) for _ in range(args.repeats)]
            prefill = pre.shape[1] / statistics.median(t)
            beside = []  # lmlab's 512-token prefill right after each llama.cpp run
            # a chat-sized prompt: up to 64 rows the quantized matmuls stream the weights instead of BLAS
            t = [prefill_seconds(model, pre[:, :40]) for _ in range(args.repeats)]
            prefill_short = 40 / statistics.median(t)
            for batch in args.batches:
                ids, mask = left_pad(chat[:batch], tok.pad_token_id)
                res = {}
                for mode, compile_ in (("eager", False), ("compiled", True)):
                    cfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[], compile=compile_)
                    timed_decode(model, ids, mask, cfg, tok.pad_token_id)  # warm-up / compile
                    t, whole = [], []
                    for _ in range(args.repeats):
                        if gguf and batch == 1 and compile_:  # side by side: a drifting machine hits both
                            refs.append(llamacpp_speed(gguf, chat[0], long_prompt, args.new_tokens, 3, threads))
                            beside.append(prefill_seconds(model, pre))
                        after_first, total = timed_decode(model, ids, mask, cfg, tok.pad_token_id)
                        t.append(after_first)
                        whole.append(total)
                    res[mode] = batch * (args.new_tokens - 1) / statistics.median(t)
                    res[mode + " whole"] = batch * args.new_tokens / statistics.median(whole)
                gbs = res["compiled"] / batch * nbytes / 1e9
                ref = None
                if refs and None not in refs:
                    ref = (statistics.median(r[0] for r in refs), statistics.median(r[1] for r in refs))
                    prefill = pre.shape[1] / statistics.median(beside)  # the alongside runs' median
                theirs = (
                    f"{ref[0]:>11.1f}{ref[1]:>12.0f}{res['compiled'] / ref[0]:>15.2f}x"
                    if ref and batch == 1
                    else " " * 39
                )
                print(f"{name:<20}{nbytes / 1e6:>8.0f}{batch:>6}{res['eager']:>8.1f}{res['compiled']:>10.1f}{gbs:>6.1f}"
                      f"{gbs / read:>6.0%}"
                      f"{prefill:>12.0f}{theirs}{res['compiled whole']:>13.1f}{prefill_short:>11.0f}"
                      f"{f'{prefill / ref[1]:.2f}x' if ref and batch == 1 else '':>24}", flush=True)  # fmt: skip
        del model


def activation_error(args: argparse.Namespace) -> None:
    """How far integer activations move a prefill's logits: per-channel int8 SmolLM2 on --act-tokens
    tokens of --act-corpus's test split (KJV), each scheme against float32 activations (the exact path) on the same
    weights: the largest logit difference over the largest logit, and the share of positions whose
    greedy token is the same."""
    from lmlab.model.quantized import QuantLinear

    model, tok = load_pretrained(MODEL)
    quantize_model(model, QuantConfig(bits=8, activations="float32"))  # each scheme set below
    ids = torch.tensor([tok.encode(" ".join(load_texts(args.act_corpus, "test")[:400]))[: args.act_tokens]])
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    print(f"logits of a {ids.shape[1]}-token prefill against float32 activations (same int8 weights)")
    with torch.inference_mode():  # the scale of float32's own rounding: the same model in float64
        reference = copy.deepcopy(model).double()(ids)[0]  # (float64 activations take no integer path)
    exact = None
    for activations in ("float32", "int24", "int16", "int8"):
        for m in layers:
            m.activations = activations
        with torch.inference_mode():
            logits = model(ids)[0].float()  # (T, V)
        if exact is None:
            exact = logits
            err = float((logits.double() - reference).abs().max() / reference.abs().max())
            print(f"  float32 (the exact path) against float64: max |diff| / max |logit| {err:.1e}")
            continue
        err = float((logits - exact).abs().max() / exact.abs().max())
        err64 = float((logits.double() - reference).abs().max() / reference.abs().max())
        differ = logits.argmax(-1) != exact.argmax(-1)
        top2 = exact.topk(2, -1).values
        gaps = (top2[:, 0] - top2[:, 1])[differ]  # how close the exact path's own choice was where they part
        widest = f", exact top-2 gap there at most {float(gaps.max()):.3f}" if len(gaps) else ""
        print(f"  {activations:<6} max |diff| / max |logit| {err:.1e} (against float64 {err64:.1e})   greedy token the same at "
              f"{1 - float(differ.float().mean()):.2%} of positions{widest}")  # fmt: skip
    layer_errors(model, layers, ids)


def layer_errors(model, layers: list, ids: torch.Tensor) -> None:
    """Each layer on its own real input: int24's distance from the float64 product over float32's
    (relative Frobenius norms); then one synthetic layer whose input has an outlier column its weights
    ignore, where int24's per-row grid costs the small entries their digits."""
    from lmlab.kernels import quant

    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, out: inputs.__setitem__(m, a[0].reshape(-1, a[0].shape[-1])))
             for m in layers]  # fmt: skip
    for m in layers:
        m.activations = "float32"
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()

    def ratio(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
        true = x.double() @ (q.double() * scale.double()).t()
        f32 = quant.int8_linear(x, q, scale).double()
        i24 = quant.int24_dynamic_linear(x, q, scale).double()
        return float((i24 - true).norm() / (f32 - true).norm())

    with torch.inference_mode():
        r = torch.tensor([ratio(inputs[m], m.qweight, m.scales) for m in layers])
    print(f"  per layer ({len(r)}): int24's error against float64 over float32's: median {float(r.median()):.1f}x, "
          f"max {float(r.max()):.1f}x")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=g)
    q = torch.randint(-127, 128, (576, 576), dtype=torch.int8, generator=g)
    q[:, 0] = 0  # the outlier column's weights: nothing downstream reads it
    scale = torch.rand(576, 1, generator=g) / 50
    out = []
    for big in (1e2, 1e3, 1e4):
        x[:, 0] = big
        out.append(f"{big:.0e}: {ratio(x, q, scale):,.0f}x")
    print(f"  synthetic, an outlier column its weights ignore (outlier / typical entry): {', '.join(out)}")


def main() -> None:
    global CALIB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl", action="store_true", help="perplexity table")
    ap.add_argument("--speed", action="store_true", help="decode and prefill speed table")
    ap.add_argument("--ppl-chars", type=int, default=60_000)
    ap.add_argument("--gptq-samples", type=int, default=64, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--calib", default=CALIB, help="GPTQ calibration corpora, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="out/bench-quantize", help="where the exported GGUF files are kept")
    ap.add_argument("--mmlu", type=int, default=0, help="--ppl: also MMLU accuracy on this many questions (0: none)")
    ap.add_argument("--only", nargs="*", help="only these rows (names as printed)")
    ap.add_argument("--act-error", action="store_true", help="how far int24/int16/int8 activations move the logits")
    ap.add_argument("--act-tokens", type=int, default=512, help="--act-error: prefill length")
    ap.add_argument("--act-corpus", default="kjv", help="--act-error: the test split it reads (lmlab data fetch)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not (args.ppl or args.speed or args.act_error):
        args.ppl = args.speed = True
    if not Path(packaged_path(MODEL)).exists():
        sys.exit("SmolLM2 is not installed: run make setup")
    CALIB = args.calib
    if args.act_error:
        activation_error(args)
    if args.ppl:
        quality(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
