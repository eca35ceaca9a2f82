"""Real weights that install offline: SmolLM2-135M-Instruct (GGUF, Q4_1) and all-MiniLM-L6-v2 (BERT)."""

from __future__ import annotations

import pytest
import torch
import transformers

import lmlab

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "中国的首都是哪里？请用一句话回答。"},
        {"role": "assistant", "content": "北京。"},
        {"role": "user", "content": "Why is the sky blue? 🌤"},
    ],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    ours, tokenizer = lmlab.load_pretrained(smollm2_gguf)
    kwargs = dict(gguf_file=smollm2_gguf.name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    their_tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    return ours, tokenizer, theirs.eval(), their_tok


@pytest.mark.parametrize("messages", PROMPTS)
def test_smollm2_chat_template_and_ids_match_transformers(smollm2, messages):
    _, tok, _, their_tok = smollm2
    for gen in (True, False):
        text = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == their_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert tok.encode(text) == their_tok(text).input_ids
    assert tok.decode(tok.encode(text)) == text


def test_smollm2_tokenizer_matches_on_hard_strings(smollm2):
    _, tok, _, their_tok = smollm2
    for text in [
        "2024-11-22 was 12345 days",
        "  two leading spaces\n\ttab",
        "中文，日本語、한국어 😀🎉",
        "a<|im_end|>b",
    ]:
        assert tok.encode(text) == their_tok(text).input_ids
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_logits_match_transformers(smollm2):
    ours, tok, theirs, _ = smollm2
    texts = [tok.apply_chat_template(m, add_generation_prompt=True) for m in PROMPTS]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(ids):  # left padding, as generation uses
        batch[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    with torch.no_grad():
        got = ours(batch, attention_mask=mask)
        want = theirs(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (got - want).abs()[mask.bool()].max().item() <= 1e-3


def test_smollm2_converted_directory_loads_in_transformers(smollm2, tmp_path):
    ours, tok, theirs, _ = smollm2
    lmlab.save_pretrained(ours, tok, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template(PROMPTS[1], add_generation_prompt=True)
    assert reloaded_tok.apply_chat_template(PROMPTS[1], add_generation_prompt=True, tokenize=False) == text
    ids = torch.tensor([reloaded_tok(text).input_ids])
    assert ids[0].tolist() == tok.encode(text)
    with torch.no_grad():
        assert (reloaded(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-3
    again, again_tok = lmlab.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    assert again_tok.encode(text) == tok.encode(text)


def _mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_match_transformers(minilm_dir):
    ours, tok = lmlab.load_pretrained(minilm_dir)
    theirs = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "一个男人在吃东西。",
        "The fox jumps!",
        "ok",
    ]
    ids = tok.encode_batch(sentences)
    assert ids == their_tok(sentences).input_ids
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        got = _mean_pool(ours(batch, attention_mask=mask), mask)
        out = theirs(input_ids=batch, attention_mask=mask)
        want = _mean_pool(out.last_hidden_state, mask)
        assert (ours.pool(ours(batch, attention_mask=mask)) - out.pooler_output).abs().max().item() <= 1e-4
    assert (got - want).abs().max().item() <= 1e-4
    # and the embeddings mean something: the paraphrase pair is closer than the unrelated one
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 3]


def test_token_bytes_rebuild_the_utf8_text(smollm2):
    _, tok, _, _ = smollm2
    text = "中国的首都是北京。𠀀 rare CJK, emoji 🧪 and ASCII"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode("utf-8")


def test_top_next_tokens_match_transformers_softmax(smollm2):
    from lmlab.generate.explain import top_next_tokens

    ours, tok, theirs, their_tok = smollm2
    prompt = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True)
    top = top_next_tokens(ours, tok, prompt, k=5)
    with torch.no_grad():
        probs = theirs(torch.tensor([their_tok(prompt).input_ids])).logits[0, -1].softmax(-1)
    want_p, want_i = probs.topk(5)
    assert [p for _, p in top] == pytest.approx(want_p.tolist(), abs=1e-4)
    assert [t for t, _ in top] == [repr(their_tok.decode([i])) for i in want_i.tolist()]
