"""Vocabulary extension: unknown characters get their own ids and rows; what was there is unchanged."""

from __future__ import annotations

import torch
import transformers

from lmlab.finetune.vocab import extend_vocabulary, unknown_characters
from lmlab.model import load_pretrained, save_pretrained


def test_extension_gives_unknown_characters_ids_and_keeps_the_rest(tmp_path, tiny_bert):
    model, tok = load_pretrained(tiny_bert, head="token_cls", num_labels=3)
    model.eval()
    texts = ["江泽民在北京", "江泽民", "北京", "hello 北京"]
    unk = tok.token_id("[UNK]")
    chars = unknown_characters(tok, texts, min_count=2)
    assert chars and all(tok.encode(c, add_special_tokens=False) == [unk] for c in chars)
    assert "在" not in chars  # seen once: below min_count
    english = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        before = model(english)
    old_rows = model.embed.weight.detach().clone()
    n = extend_vocabulary(model, tok, chars)
    assert n == len(chars) and model.cfg.vocab_size == tok.vocab_size == old_rows.shape[0] + n
    assert torch.equal(model.embed.weight[: old_rows.shape[0]], old_rows)
    with torch.no_grad():
        torch.testing.assert_close(model(english), before, atol=0, rtol=0)
    ids = tok.encode("江泽民 北京", add_special_tokens=False)
    assert unk not in ids and len(ids) == 5 and max(ids) >= old_rows.shape[0]  # 泽 is new; 江, 民, 北, 京 were there
    # the grown model and tokenizer load in transformers with the same logits
    save_pretrained(model, tok, tmp_path / "grown")
    theirs = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "grown").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "grown")
    assert hf_tok("江泽民 北京", add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([tok.encode("江泽民在北京 hello")])
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(input_ids=x).logits, atol=1e-4, rtol=0)
