"""GGUF export: lmlab's own loader reads back exactly what was written, and llama.cpp (the format's reference
implementation, run through node-llama-cpp) computes the same tokens as lmlab from the exported file."""

from __future__ import annotations

import time

import pytest
import torch

from lmlab.cli import main
from lmlab.compress.ggml_blocks import dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0
from lmlab.compress.gguf_export import export_gguf
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.gguf import open_gguf
from tests.llamacpp import run_llamacpp

TEXTS = [
    "Hello world! The year 2024 had 366 days.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "def add(a, b):\n    return a + b  # <|im_end|> in code",
    "  leading spaces, tabs\tand émojis 🙂 mixed with 中文 and numbers 3.14159",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
PLAIN = [t for t in TEXTS if "<|" not in t]  # no special-token strings: tokenized the same with or without parsing


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_small(split: str | None = None):
    """A 400-token byte-level BPE with special tokens, a plain added token and a chat template; GPT-2's split,
    or `split` (a regex) before a byte-level step, as Llama 3 does."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    from lmlab.tokenizer.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(TEXTS * 10, trainer)
    backend.add_tokens(["<think>"])  # an added token that is not special (GGUF type USER_DEFINED)
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    return Tokenizer(backend, config, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def small_tokenizer():
    """GPT-2's split; the real SmolLM2 vocabulary makes every GGUF read take seconds, so it is left to (b), (c)."""
    return _train_small()


def _tiny(preset: str, tokenizer, **overrides) -> Transformer:
    """A random tiny model; 8 embedding rows past the tokenizer's end test the vocabulary padding; weights
    drawn wide so that a wrong row order shows."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg = ModelConfig.from_preset(
        preset, vocab_size=tokenizer.vocab_size + 8, pad_token_id=tokenizer.pad_token_id, **ids, **overrides
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.ndim == 2 else 1.0)
    return model


def _tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


# ---- (a) export -> lmlab's GGUF loader is the identity ----------------------------------------------------


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_f32_round_trip_is_identity(preset, small_tokenizer, tmp_path):
    model = _tiny(preset, small_tokenizer)
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", "f32")
    back, tok = load_pretrained(path)
    arch = "qwen2" if preset == "qwen2-tiny" else "llama"
    assert open_gguf(path).fields["general.architecture"].contents() == arch
    # config: every field survives (the RMSNorm epsilon as the float32 GGUF stores)
    want = model.cfg.to_dict() | {"norm_eps": float(torch.tensor(model.cfg.norm_eps, dtype=torch.float32))}
    assert back.cfg.to_dict() == want
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    names = set(_tensor_types(path))
    assert ("output.weight" in names) == (not model.cfg.tie_embeddings)
    assert ("blk.0.attn_q.bias" in names) == (preset == "qwen2-tiny")
    # tokenizer: same ids (special tokens too), specials and chat template; the padded ids are placeholders
    for text in TEXTS:
        assert tok.encode(text) == small_tokenizer.encode(text)
    assert tok.special == small_tokenizer.special
    assert tok.chat_template == small_tokenizer.chat_template
    n = model.cfg.vocab_size
    assert tok.vocab_size == n and tok.id_to_token(n - 1) == f"[PAD{n - 1}]"
    assert tok.encode("<think>") == small_tokenizer.encode("<think>") == [small_tokenizer.token_id("<think>")]


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_quantized_round_trip(quant, small_tokenizer, tmp_path):
    """lmlab reads back exactly the dequantized blocks: quantization is per row, so llama's Q/K row
    permutation commutes with it."""
    model = _tiny("llama-tiny", small_tokenizer, d_ff=192, tie_embeddings=True)
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", quant)
    back, _ = load_pretrained(path)
    types = _tensor_types(path)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == quant.upper()
    # q4_0: the (tied) output matrix stays at 8 bits, as llama-quantize keeps it at higher precision
    assert types["token_embd.weight"] == ("Q8_0" if quant == "q4_0" else quant.upper())
    roundtrip = {
        "F16": lambda w: w.half().float(),
        "Q8_0": lambda w: dequantize_q8_0(*quantize_q8_0(w)),
        "Q4_0": lambda w: dequantize_q4_0(*quantize_q4_0(w)),
    }
    ours = {n: p for n, p in model.named_parameters()}
    gguf_names = {"embed.weight": "token_embd.weight", "layers.1.mlp.down.weight": "blk.1.ffn_down.weight"}
    gguf_names |= {"layers.0.attn.q.weight": "blk.0.attn_q.weight", "layers.0.attn.k.weight": "blk.0.attn_k.weight"}
    for name, gname in gguf_names.items():
        expected = roundtrip[types[gname]](ours[name].detach())
        assert torch.equal(back.state_dict()[name], expected), name
    assert torch.equal(back.state_dict()["norm.weight"], model.state_dict()["norm.weight"])


def test_mistral_exports_as_llama_without_its_window(small_tokenizer, tmp_path):
    """llama.cpp runs Mistral as "llama" and has no sliding window there: dropped, with a warning."""
    model = _tiny("mistral-tiny", small_tokenizer)
    with pytest.warns(UserWarning, match="sliding_window=8 is not stored"):
        path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", "f32")
    back, _ = load_pretrained(path)
    assert back.cfg.sliding_window is None and back.cfg.family == "llama"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


# ---- the command and its errors -----------------------------------------------------------------------------


def test_cli_convert_to_gguf(small_tokenizer, tmp_path, capsys):
    model = _tiny("qwen2-tiny", small_tokenizer, d_ff=192)
    save_pretrained(model, small_tokenizer, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out.gguf"), "--quant", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _tensor_types(tmp_path / "out.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left
    # default f16 (llama.cpp's converter default); --to gguf without the suffix
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out.bin"), "--to", "gguf"]) == 0
    assert _tensor_types(tmp_path / "out.bin")["blk.0.attn_q.weight"] == "F16"


def test_auto_dequantize_keeps_gguf_blocks_where_the_kernels_run(small_tokenizer, tmp_path):
    """dequantize="auto" (`lmlab generate`/`chat`) keeps a GGUF file's Q8_0 blocks (the same weights,
    fewer bytes) where lmlab's quantized CPU kernels run, and loads float32 weights where they do
    not (the GPU policy, forced here); the greedy tokens are the same either way."""
    from lmlab.generate import GenerationConfig, generate_ids
    from lmlab.kernels import quant
    from lmlab.model.quantized import QuantLinear
    from lmlab.utils.device import forced_policy, policy

    model = _tiny("qwen2-tiny", small_tokenizer, d_ff=192)
    path = str(export_gguf(model, small_tokenizer, tmp_path / "m.gguf", "q8_0"))
    kept, _ = load_pretrained(path, device="cpu", dequantize="auto")
    with forced_policy(policy("cuda")):
        plain, _ = load_pretrained(path, device="cpu", dequantize="auto")
    assert any(isinstance(m, QuantLinear) for m in kept.modules()) == quant.available()
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    ids = torch.tensor([[5, 9, 13, 2, 40]])
    config = GenerationConfig(max_new_tokens=8, stop_token_ids=[])
    assert (
        generate_ids(kept, ids, config=config, eos=[]).tolist()
        == generate_ids(plain, ids, config=config, eos=[]).tolist()
    )


@pytest.mark.parametrize(
    ("preset", "quant", "message"),
    [
        ("gpt2-tiny", "f16", "gpt2 has pos='learned'"),
        ("bert-tiny", "f16", "bert has causal=False"),
        ("chatglm-tiny", "f16", "prefix_lm=True"),
        ("llama-tiny", "q8_0", "tensor blk.0.ffn_down.weight has rows of 176 values, not divisible by 32"),
        ("llama-tiny", "q4_0", "not divisible by 32 as q4_0 needs"),
    ],
)
def test_cli_refuses_what_it_cannot_export(preset, quant, message, small_tokenizer, tmp_path, capsys):
    cfg = ModelConfig.from_preset(preset, vocab_size=small_tokenizer.vocab_size)
    save_pretrained(Transformer(cfg), small_tokenizer, tmp_path / "hf")
    out = tmp_path / "out.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(out), "--quant", quant]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".out.gguf*")) == []


# ---- (b), (c) llama.cpp computes what lmlab computes from the exported file --------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 10.",
    "请用一句话介绍一下北京。",
    "天空为什么是蓝色的？",
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi there"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！有什么可以帮你？"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        "add_generation_prompt": True,
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
# teacher forcing: prose, code, Chinese and a chat, 80-190 tokens each (593 positions in all)
FORCED = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from wine making. Books became cheaper, and literacy "
    "spread across Europe. Within fifty years, printers in more than two hundred cities had produced millions of "
    "copies, and ideas that once travelled slowly from one monastery to another now reached thousands of readers "
    "in a few months. Scholars could compare identical copies of a text, which made science more cumulative.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. Plants store the sugar as starch "
    "and release the oxygen into the air, which is why forests matter for the atmosphere. The process happens in "
    "chloroplasts, small green structures inside leaf cells. Chlorophyll absorbs red and blue light and reflects "
    "green light, which is why most plants look green to us. Without photosynthesis, there would be no food chains.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'
    "        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n    if n < 2:\n        return False\n"
    "    for i in range(2, int(n ** 0.5) + 1):\n        if n % i == 0:\n            return False\n    return True\n\n"
    "print([fibonacci(i) for i in range(10)])\nprint([n for n in range(30) if is_prime(n)])\n",
    "长城是中国古代的军事防御工程，修建历史可以追溯到西周时期。今天它是世界上最著名的旅游景点之一，每年吸引数百万游客。"
    "北京是中国的首都，也是政治和文化中心。这座城市有三千多年的历史，故宫、天坛和颐和园都是著名的古迹。",
    "<|im_start|>user\nExplain gravity to a child.<|im_end|>\n<|im_start|>assistant\nGravity is an invisible pull "
    "that makes things fall down to the ground and keeps the Moon going around the Earth. When you jump, gravity "
    "pulls you back down. The bigger something is, the stronger it pulls, so the Earth pulls on you much more "
    "than a ball does.<|im_end|>\n<|im_start|>user\nWhy doesn't the Moon fall down?<|im_end|>\n",
]
N_NEW = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """SmolLM2-135M-Instruct (the packaged Q4_1 file, dequantized by lmlab) and its tokenizer."""
    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """Export SmolLM2 once per quant type for the module; (path, lmlab model and tokenizer reloaded from it)."""
    cache = {}

    def get(quant: str):
        if quant not in cache:
            path = tmp_path_factory.mktemp(quant) / f"smollm2-{quant}.gguf"
            t = time.perf_counter()
            export_gguf(*smollm2, path, quant)
            print(f"export {quant}: {time.perf_counter() - t:.1f} s, {path.stat().st_size / 2**20:.0f} MiB")
            cache[quant] = path, *load_pretrained(path)
        return cache[quant]

    return get


def _lmlab_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, no stopping at EOS (llama.cpp's side does not stop either)."""
    from lmlab.generate.config import GenerationConfig
    from lmlab.generate.decode import generate_ids

    out = generate_ids(model, torch.tensor([ids]), config=GenerationConfig(max_new_tokens=n), eos=[])
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def _lmlab_argmax(model, ids: list[int]) -> list[int]:
    return model(torch.tensor([ids])).argmax(-1)[0].tolist()


def test_smollm2_f32_matches_llamacpp(smollm2, exported):
    """Tokenization, chat template and greedy continuations: identical in llama.cpp and lmlab."""
    _, tokenizer = smollm2
    path, model, back = exported("f32")
    # the real vocabulary (49152 tokens, SmolLM2's digit-splitting pre-tokenizer) survives the round trip
    assert [back.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
    assert back.chat_template == tokenizer.chat_template and back.special == tokenizer.special
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS
    ]
    prompt_ids = [tokenizer.encode(c, add_special_tokens=False) for c in chats]
    t = time.perf_counter()
    got = run_llamacpp(
        path,
        [
            {"mode": "tokenize", "texts": PLAIN + PROMPTS, "special": False},
            {"mode": "tokenize", "texts": chats + TEXTS, "special": True},
            {"mode": "chat_template", "conversations": CHATS},
            {"mode": "greedy", "prompts": prompt_ids, "n": N_NEW},
        ],
    )
    print(f"llama.cpp: {time.perf_counter() - t:.1f} s; {got['info']}")
    plain, special, rendered, greedy = got["results"]
    # tokenization: plain text, and text with special tokens in it (parsed as special)
    assert plain == [tokenizer.encode(t, add_special_tokens=False) for t in PLAIN + PROMPTS]
    assert special == [tokenizer.encode(t, add_special_tokens=False) for t in chats + TEXTS]
    # no BOS twice: the file says not to add one, llama.cpp reads it so, and lmlab's encode agrees
    assert got["info"]["add_bos"] is False and tokenizer.encode("Hi") == tokenizer.encode(
        "Hi", add_special_tokens=False
    )
    # the chat template read back from the file renders as lmlab renders it
    ours = [tokenizer.apply_chat_template(c["messages"], add_generation_prompt=c.get("add_generation_prompt", False))
            for c in CHATS]  # fmt: skip
    assert rendered == ours
    t = time.perf_counter()
    mine = [_lmlab_greedy(model, ids, N_NEW) for ids in prompt_ids]
    print(f"lmlab greedy: {time.perf_counter() - t:.1f} s")
    for prompt, a, b in zip(PROMPTS, mine, greedy):
        print(f"{prompt!r} -> {tokenizer.decode(a)!r} (smallest llama.cpp top-2 logit gap {min(b['margins']):.3f})")
        assert a == b["tokens"], (
            f"{prompt!r}: lmlab {tokenizer.decode(a)!r} vs llama.cpp {tokenizer.decode(b['tokens'])!r}"
        )


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_smollm2_quantized_argmax_agrees_with_llamacpp(quant, smollm2, exported):
    """Teacher forcing on 5 texts: lmlab (the file dequantized to fp32) and llama.cpp (quantized kernels,
    8-bit activations) pick the same next token at >= 95% of positions. Measured (one CPU): q8_0 96.5%,
    q4_0 95.3%, while lmlab's own q4_0 vs f32 agree at 67%, so the two read the same quantized model."""
    _, tokenizer = smollm2
    path, model, _ = exported(quant)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in FORCED]
    theirs = run_llamacpp(path, [{"mode": "teacher", "sequences": sequences}])["results"][0]
    same = total = 0
    gaps = []  # llama.cpp's top-2 logit gap where the two disagree: near-ties, or a real difference?
    for ids, b in zip(sequences, theirs):
        a = _lmlab_argmax(model, ids)
        same += sum(x == y for x, y in zip(a, b["tokens"], strict=True))
        gaps += [round(g, 3) for x, y, g in zip(a, b["tokens"], b["margins"]) if x != y]
        total += len(ids)
    print(f"{quant}: next-token argmax agreement lmlab vs llama.cpp {same}/{total} = {same / total:.1%}; gaps {gaps}")
    assert same / total >= 0.95
    # where they differ, llama.cpp's own top two were nearly tied: rounding, not a misread tensor (a wrong
    # scale or nibble order moves logits by whole units and drops agreement to a few percent)
    assert max(gaps, default=0.0) < 1.0


@pytest.mark.parametrize(
    ("preset", "quant"), [("llama-tiny", "f32"), ("qwen2-tiny", "f32"), ("llama-tiny", "f16"), ("qwen2-tiny", "f16")]
)
def test_tiny_models_match_llamacpp(preset, quant, small_tokenizer, tmp_path):
    """Both architectures in llama.cpp: llama (untied head, GQA, Q/K rows interleaved) and qwen2 (biases, tied
    head, rows as they are), f32 and f16. Every argmax agrees except at near-ties: llama.cpp keeps K and V (and,
    for f16 weights, activations) in float16, which moves logits by ~1e-2; a wrong row order or a missing bias
    changes most of them (without the Q/K permutation 21 of 100 agreed)."""
    model = _tiny(preset, small_tokenizer, d_ff=192)
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", quant)
    model = load_pretrained(path)[0]  # the weights as stored (f16: rounded)
    sequences = [small_tokenizer.encode(t) for t in TEXTS]
    theirs = run_llamacpp(path, [{"mode": "teacher", "sequences": sequences}])["results"][0]
    decisive = 0
    for ids, b in zip(sequences, theirs):
        for pos, (x, y, gap) in enumerate(zip(_lmlab_argmax(model, ids), b["tokens"], b["margins"], strict=True)):
            if gap >= 0.1:  # llama.cpp's top two logits at least 0.1 apart
                decisive += 1
                assert x == y, f"position {pos} of {ids}: lmlab {x}, llama.cpp {y} (top-2 gap {gap:.3f})"
    assert decisive >= 0.8 * sum(map(len, sequences))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_pre_tokenizer_names_split_as_llamacpp_does(pre, tmp_path):
    """The pre-tokenizer name written to the file makes llama.cpp split text as lmlab does ("smollm": (b))."""
    from lmlab.tokenizer.gguf import _SPLITS

    tokenizer = _train_small(None if pre == "gpt-2" else _SPLITS[pre])
    path = export_gguf(_tiny("llama-tiny", tokenizer), tokenizer, tmp_path / "m.gguf", "f32")
    assert open_gguf(path).fields["tokenizer.ggml.pre"].contents() == pre
    texts = [*TEXTS, "I'm sure they'll say 1234567 isn't    2 much\n\n\tok?", "ÀÉÎõü ñ 日本語のテキスト"]
    got = run_llamacpp(path, [{"mode": "tokenize", "texts": texts, "special": True}])["results"][0]
    assert got == [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_add_bos_is_stored_once(tmp_path):
    """A tokenizer that prepends BOS: the file says so (llama.cpp then prepends it itself), and lmlab reading
    the file back prepends exactly one, so a prompt never starts with two."""
    from tokenizers import processors

    tokenizer = _train_small()
    bos = tokenizer.bos_token_id
    tokenizer.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert tokenizer.encode("hi")[0] == bos
    path = export_gguf(_tiny("llama-tiny", tokenizer), tokenizer, tmp_path / "m.gguf", "f32")
    assert open_gguf(path).fields["tokenizer.ggml.add_bos_token"].contents() is True
    _, back = load_pretrained(path)
    assert back.encode("hi") == tokenizer.encode("hi") and back.encode("hi").count(bos) == 1
    assert run_llamacpp(path, [])["info"]["add_bos"] is True
