"""Decoding invariants: cached == recomputed, seeded sampling reproducible, stop strings exact, streams valid."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

import lmlab
from lmlab.generate import GenerationConfig, KVCache, generate, stream
from lmlab.generate.decode import left_pad
from lmlab.generate.stream import IncrementalDecoder, StopStrings
from lmlab.model.config import PRESETS, ModelConfig
from lmlab.tokenizer import Tokenizer

DECODERS = [name for name, p in PRESETS.items() if p.get("causal", True) and name.endswith("tiny")]


def _model(preset: str, **overrides) -> lmlab.Transformer:
    torch.manual_seed(0)
    return lmlab.Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


@pytest.mark.parametrize("preset", DECODERS)
def test_preallocated_cache_decode_equals_full_recompute(preset):
    m = _model(preset, max_seq_len=8 if preset == "qwen-logn-tiny" else 64)
    torch.manual_seed(1)
    rows = [torch.randint(3, 512, (n,)).tolist() for n in (6, 9, 3)]
    ids, mask = left_pad(rows, 0)
    new = torch.randint(3, 512, (3, 8))
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = m(full_ids, attention_mask=full_mask)
        cache = KVCache.for_model(m, 3, full_ids.shape[1])
        steps = [m(ids, attention_mask=mask, kv_cache=cache)]
        for t in range(new.shape[1]):
            width = ids.shape[1] + t + 1
            steps.append(m(new[:, t : t + 1], attention_mask=full_mask[:, :width], kv_cache=cache))
    cached = torch.cat(steps, 1)
    assert (cached - full).abs()[full_mask.bool()].max().item() <= 1e-4


def _byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with single-byte tokens only: every CJK character spans 3 tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, {"eos_token": "<eos>"})


def test_incremental_decoder_never_shows_half_a_character():
    tok = _byte_tokenizer()
    text = "北京是中国的首都, emoji 🧪 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # really split into bytes
    dec = IncrementalDecoder(tok)
    pieces = [p for i in ids if (p := dec.push(i))]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_find_and_hold_back():
    s = StopStrings(["\nUser:", "###"])
    assert s.find("hello\nUser: hi", 0) == 5
    assert s.find("a ## b ### c", 0) == 7
    assert s.find("hello", 0) is None
    assert s.safe_end("answer\nUs") == len("answer")  # "\nUs" might become "\nUser:"
    assert s.safe_end("answer#") == len("answer")
    assert s.safe_end("answer") == len("answer")


@pytest.fixture(scope="module")
def smol():
    model, tok = lmlab.load_pretrained("smollm2-135m-instruct")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "List three fruits, one per line."}], add_generation_prompt=True
    )
    return model, tok, prompt


def test_seeded_sampling_is_reproducible_and_seed_dependent(smol):
    model, tok, prompt = smol
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a, b = generate(model, tok, prompt, cfg)[0], generate(model, tok, prompt, cfg)[0]
    assert a.token_ids == b.token_ids
    others = {tuple(generate(model, tok, prompt, cfg.replace(seed=s))[0].token_ids) for s in range(4)}
    assert len(others) > 1


def test_stop_string_cuts_output_exactly(smol):
    model, tok, prompt = smol
    full = generate(model, tok, prompt, max_new_tokens=40)[0]
    assert "\n" in full.text, full.text
    stopped = generate(model, tok, prompt, max_new_tokens=40, stop=["\n"])[0]
    assert stopped.text == full.text[: full.text.index("\n")]
    assert stopped.finish_reason == "stop"
    assert len(stopped.token_ids) < len(full.token_ids)  # it really stopped early
    # streaming shows exactly the same text, and never the stop string
    assert "".join(stream(model, tok, prompt, max_new_tokens=40, stop=["\n"])) == stopped.text


def test_stream_equals_generate_and_batch_equals_single(smol):
    model, tok, prompt = smol
    other = tok.apply_chat_template([{"role": "user", "content": "用中文说你好。"}], add_generation_prompt=True)
    single = [generate(model, tok, p, max_new_tokens=24)[0] for p in (prompt, other)]
    batched = generate(model, tok, [prompt, other], max_new_tokens=24)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    for p, g in zip((prompt, other), single):
        pieces = list(stream(model, tok, p, max_new_tokens=24))
        assert "".join(pieces) == g.text
        assert all("\ufffd" not in piece for piece in pieces)


def test_logprobs_are_the_models(smol):
    model, tok, prompt = smol
    g = generate(model, tok, prompt, max_new_tokens=5, logprobs=True)[0]
    ids = torch.tensor([tok.encode(prompt) + g.token_ids])
    with torch.no_grad():
        logp = model(ids)[0].log_softmax(-1)
    n = len(tok.encode(prompt))
    want = [logp[n - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
    assert g.logprobs == pytest.approx(want, abs=1e-4)


def test_bad_settings_name_the_field():
    with pytest.raises(lmlab.LmlabError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(lmlab.LmlabError, match="temperature"):
        GenerationConfig(temperature=-1)


def test_a_character_cut_by_the_token_limit_is_dropped_not_shown_half():
    tok = _byte_tokenizer()
    ids = tok.encode("好的北京")
    dec = IncrementalDecoder(tok)
    shown = "".join(dec.push(i) for i in ids[:-1]) + dec.flush()  # the last character lost its last byte
    assert shown == "好的北"
