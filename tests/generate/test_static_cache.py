"""The static KV cache and the compiled decode step: same logits and tokens as the eager, growing cache."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import lmlab
from lmlab.generate import GenerationConfig, cpu_kernels, generate_ids
from lmlab.generate.decode import capacity_for, left_pad
from lmlab.generate.kv_cache import StaticKVCache
from lmlab.model.config import PRESETS, ModelConfig

DECODERS = [name for name, p in PRESETS.items() if p.get("causal", True) and name.endswith("tiny")]


def _model(preset: str, **overrides) -> lmlab.Transformer:
    torch.manual_seed(0)
    return lmlab.Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return left_pad([torch.randint(3, 512, (n,)).tolist() for n in (6, 9, 3)], 0)


@pytest.mark.parametrize("preset", DECODERS)
def test_static_cache_decode_equals_full_recompute(preset):
    # every switch that shapes attention (sliding window, ALiBi, logn, GQA, learned positions) must
    # see the queries at their slots, not at the end of the buffer; spare slots stay masked out
    m = _model(preset, max_seq_len=8 if preset == "qwen-logn-tiny" else 64)
    ids, mask = _prompts()
    new = torch.randint(3, 512, (3, 8))
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    width = full_ids.shape[1] + 5
    slots = torch.zeros(3, width, dtype=torch.long)
    slots[:, : ids.shape[1]] = mask
    with torch.no_grad():
        full = m(full_ids, attention_mask=full_mask)
        cache = StaticKVCache.for_model(m, 3, width)
        cache.advance(ids.shape[1])
        steps = [m(ids, attention_mask=slots, kv_cache=cache)]
        for t in range(new.shape[1]):
            slots[:, ids.shape[1] + t] = 1
            cache.advance(1)
            steps.append(m(new[:, t : t + 1], attention_mask=slots, kv_cache=cache))
    cached = torch.cat(steps, 1)
    assert (cached - full).abs()[full_mask.bool()].max().item() <= 1e-4


def test_static_cache_refuses_to_overflow_and_needs_a_mask():
    m = _model("llama-tiny")
    cache = StaticKVCache.for_model(m, 1, 4)
    cache.advance(4)
    with pytest.raises(ValueError, match="full"):
        cache.advance(1)
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.ones(1, 1, dtype=torch.long), kv_cache=cache)


def test_a_model_changed_after_compiling_gets_a_graph_of_its_own():
    """The decode graphs skip dynamo's guards on the model (they cost ~18% of a quantized step), so
    changes to the model's structure or flags must reach the graph some other way: the model's
    fingerprint in the graph's key. Weights changed in place need no new graph."""
    from lmlab.finetune.lora import LoraConfig, adapters_disabled, apply_lora, lora_layers

    m = _model("llama-tiny")
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=8, stop_token_ids=[])

    def both() -> tuple[list, list]:
        eager = generate_ids(m, ids, mask, config, eos=[], pad_id=0).tolist()
        return eager, generate_ids(m, ids, mask, config.replace(compile=True), eos=[], pad_id=0).tolist()

    eager, compiled = both()
    assert compiled == eager
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # in place: the same graph reads the new values
    eager2, compiled = both()
    assert eager2 != eager and compiled == eager2
    assert counters["stats"]["unique_graphs"] == graphs
    apply_lora(m, LoraConfig(r=4, targets=["q", "v", "o"]))
    torch.manual_seed(2)
    for layer in lora_layers(m):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    eager3, compiled = both()  # new modules: a new graph that runs them
    assert eager3 != eager2 and compiled == eager3
    assert counters["stats"]["unique_graphs"] == graphs + 1
    with adapters_disabled(m):  # a flag flipped
        assert both()[1] == eager2


def test_capacity_rounds_up_to_share_graphs():
    assert [capacity_for(n) for n in (1, 64, 65, 130, 4000)] == [64, 64, 128, 256, 4096]


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_compiled_decode_gives_the_eager_tokens(preset):
    m = _model(preset)
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=[])
    eager = generate_ids(m, ids, mask, config, eos=[], pad_id=0)
    graphs = counters["stats"]["unique_graphs"]
    compiled = generate_ids(m, ids, mask, config.replace(compile=True), eos=[], pad_id=0)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # really compiled, in one graph
    assert compiled.tolist() == eager.tolist()
    # a shorter prompt in the same capacity bucket reuses the graph and still matches
    short = generate_ids(m, ids[:, 3:], mask[:, 3:], config.replace(compile=True), eos=[], pad_id=0)
    assert short.tolist() == generate_ids(m, ids[:, 3:], mask[:, 3:], config, eos=[], pad_id=0).tolist()
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_compiled_sampling_and_eos_follow_the_eager_loop():
    m = _model("llama-tiny")
    ids, _ = _prompts()
    config = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=50, seed=3)
    eager = lmlab.generate(m, None, ids.tolist(), config)
    compiled = lmlab.generate(m, None, ids.tolist(), config.replace(compile=True))
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]


def test_batch_one_decode_streams_the_matmuls_and_keeps_the_tokens():
    """The compiled step's matmuls run as the decode kernel, or, where it is not available, as
    inductor's fused multiply-sums; either way the tokens are eager's."""
    m = _model("qwen2-tiny")  # GQA and q/k/v biases: addmm as well as mm
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=[])
    before = sum(v for k, v in counters["inductor"].items() if k.startswith("decompose_"))
    with torch.profiler.profile() as prof:
        compiled = generate_ids(m, ids[1:2], mask[1:2], config.replace(compile=True), eos=[], pad_id=0)
    if cpu_kernels.available():
        calls = sum(e.count for e in prof.key_averages() if e.key == "lmlab::skinny_linear")
        assert calls >= 9 * len(m.layers) * 7  # every weight matmul of every decode step
    else:
        assert sum(v for k, v in counters["inductor"].items() if k.startswith("decompose_")) > before
    assert compiled.tolist() == generate_ids(m, ids[1:2], mask[1:2], config, eos=[], pad_id=0).tolist()


@torch._dynamo.config.patch(recompile_limit=2)
def test_more_compiled_variants_than_dynamo_keeps_per_function():
    """Batch sizes, capacities and models each compile their own graph: more of them than dynamo's
    recompile_limit must neither fall back to eager nor fail on the guard-free steps."""
    m, other = _model("llama-tiny"), _model("llama-tiny")
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=3, stop_token_ids=[])
    runs = [(m, 3, 0), (m, 2, 0), (m, 1, 0), (m, 1, 70), (other, 3, 0)]  # model, rows, extra prompt length
    for model, rows, extra in runs:
        x = torch.cat([torch.full((rows, extra), 7), ids[:rows]], 1)
        am = torch.cat([torch.ones(rows, extra, dtype=torch.long), mask[:rows]], 1)
        graphs = counters["stats"]["unique_graphs"]
        out = generate_ids(model, x, am, config.replace(compile=True), eos=[], pad_id=0)
        assert counters["stats"]["unique_graphs"] == graphs + 1
        assert out.tolist() == generate_ids(model, x, am, config, eos=[], pad_id=0).tolist()


def test_compiling_leaves_the_model_copyable_and_collectable():
    import copy
    import gc
    import weakref

    m = _model("llama-tiny")
    ids, mask = _prompts()
    generate_ids(m, ids, mask, GenerationConfig(max_new_tokens=2, compile=True), eos=[], pad_id=0)
    copy.deepcopy(m)  # nothing compiled hangs off the model
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def _gpu_policy():
    """The GPU's decode choices (no CPU kernels, compile mode "reduce-overhead", a kept static cache)
    forced on the CPU: the same code path the GPU takes, checked here where CI runs."""
    from lmlab.utils.device import forced_policy, policy

    return forced_policy(policy("cuda"))


def test_gpu_decode_policy_equals_eager_and_reuses_its_static_cache(monkeypatch):
    from lmlab.generate import decode

    m = _model("llama-tiny")
    ids, mask = _prompts()
    eager = generate_ids(m, ids, mask, GenerationConfig(max_new_tokens=6, temperature=0.0))
    calls = []
    real = torch.compile
    # a copy: torch.compile takes the guard filter out of the options it is given
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(copy.deepcopy(kw)) or real(fn, **kw))
    monkeypatch.setattr(decode, "_compiled", type(decode._compiled)())
    monkeypatch.setattr(decode, "_caches", {})
    with _gpu_policy():
        assert isinstance(cpu_kernels.for_rows(8, "cpu"), type(cpu_kernels.for_rows(1)))  # no kernels mode
        outs = [generate_ids(m, ids, mask, GenerationConfig(max_new_tokens=6, temperature=0.0, compile=True))
                for _ in range(2)]  # fmt: skip
        kept = list(decode._caches.values())
    # one compile, the policy's mode (as its options: torch.compile takes one or the other), no C++ options
    unguarded = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert calls == [{"dynamic": False, "options": {"triton.cudagraphs": True, "guard_filter_fn": unguarded}}]
    assert len(kept) == 1 and not kept[0].in_use  # the second call reused the first call's cache
    for out in outs:
        assert torch.equal(out, eager)
    torch._dynamo.reset()


def test_a_device_without_a_compile_mode_compiles_with_defaults(monkeypatch):
    """A policy with no decode compile mode (MPS, XPU, devices lmlab knows nothing about) compiles
    with inductor's defaults and no CPU kernels, and gives the eager tokens."""
    import dataclasses

    from lmlab.generate import decode
    from lmlab.utils.device import forced_policy, policy

    m = _model("llama-tiny")
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=5, temperature=0.0)
    eager = generate_ids(m, ids, mask, config)
    monkeypatch.setattr(decode, "_compiled", type(decode._compiled)())
    bare = dataclasses.replace(policy("cuda"), decode_compile_mode=None)
    with forced_policy(bare):
        assert torch.equal(generate_ids(m, ids, mask, config.replace(compile=True)), eager)


def test_tying_or_untying_weights_gets_a_graph_of_its_own():
    """Tied weights are one input of the graph; a model whose head is untied afterwards (and then
    changed) must not run the tied graph."""
    m = _model("llama-tiny", tie_embeddings=True)
    ids, mask = _prompts()
    config = GenerationConfig(max_new_tokens=6, stop_token_ids=[])
    assert m.lm_head.weight is m.embed.weight
    generate_ids(m, ids, mask, config.replace(compile=True), eos=[], pad_id=0)
    m.lm_head.weight = torch.nn.Parameter(m.embed.weight.detach().clone() * -1.0)
    eager = generate_ids(m, ids, mask, config, eos=[], pad_id=0)
    assert generate_ids(m, ids, mask, config.replace(compile=True), eos=[], pad_id=0).tolist() == eager.tolist()


def test_cpu_kernels_never_wrap_a_gpu_forward():
    from contextlib import nullcontext

    assert isinstance(cpu_kernels.for_rows(8, "cuda"), nullcontext)
    assert isinstance(cpu_kernels.for_rows(8, torch.device("cuda", 0)), nullcontext)
    assert isinstance(cpu_kernels.for_rows(8, "cpu"), cpu_kernels.DecodeKernels)
