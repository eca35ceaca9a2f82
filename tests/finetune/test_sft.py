"""SFT data: assistant-only loss masks under SmolLM2's real template, JSONL checks, packing that changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.finetune.sft import (
    IGNORE,
    SFTDataset,
    SFTExample,
    build_sft_data,
    read_sft_jsonl,
    render_example,
    sft_loss,
)
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenizer.tokenizer import Tokenizer
from lmlab.train.trainer import split_batch

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "Now say hello in Chinese."},
    {"role": "assistant", "content": "你好，世界！"},
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
    from lmlab.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)  # the tokenizer and chat template only, no weights


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions."""
    runs, start = [], None
    for t, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = t
        if label == IGNORE and start is not None:
            runs.append((start, t))
            start = None
    return runs


# -- the loss mask under a real template ----------------------------------------------------------


def test_exactly_the_assistant_tokens_carry_loss(tok):
    ex = render_example(tok, CHAT)
    assert ex.input_ids == tok.apply_chat_template(CHAT, tokenize=True)
    assert not ex.truncated
    assert all(label in (IGNORE, i) for i, label in zip(ex.input_ids, ex.labels))
    # what we expect, found independently: each assistant reply and its end token, tokenized on its own
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    expected = [tok.encode(r + "<|im_end|>", add_special_tokens=False) for r in replies]
    assert [tok.id_to_token(i) for i in expected[0]] == ["Paris", "Ġis", "Ġthe", "Ġcapital", ".", "<|im_end|>"]
    assert tok.decode(expected[1]) == "你好，世界！<|im_end|>"
    runs = _runs(ex.labels)
    assert [ex.input_ids[a:b] for a, b in runs] == expected
    assert [ex.labels[a:b] for a, b in runs] == expected
    for a, b in runs:
        # each run follows the "<|im_start|>assistant\n" header, unlabelled, and the "\n" after the end is not labelled
        assert tok.decode(ex.input_ids[a - 4 : a]) == "<|im_start|>assistant\n"
        assert tok.decode(ex.input_ids[b : b + 1]) == "\n"
        assert ex.input_ids[b - 1] == tok.eos_token_id
    unlabelled = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label == IGNORE])
    for m in CHAT:
        if m["role"] != "assistant":
            assert m["content"] in unlabelled  # system and user text, and every role header, carry no loss
    assert unlabelled.count("<|im_start|>") == len(CHAT)


def test_default_system_prompt_and_truncation(tok):
    # SmolLM2's template adds a default system turn: it must stay unlabelled
    ex = render_example(tok, CHAT[1:3])
    assert [ex.input_ids[a:b] for a, b in _runs(ex.labels)] == [tok.encode("Paris is the capital.<|im_end|>")]
    cut = render_example(tok, CHAT[1:3], max_len=len(ex) - 3)
    assert cut.truncated and len(cut) == len(ex) - 3
    assert cut.input_ids == ex.input_ids[:-3] and cut.labels == ex.labels[:-3]
    assert not render_example(tok, CHAT[1:3], max_len=len(ex)).truncated


UNSTABLE = [
    # the last turn is rendered differently: the generation prompt is not a prefix of the turn
    "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}",
    # earlier assistant turns are rewritten once a later one exists (as templates that drop reasoning do)
    "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}(old) {% endif %}"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
]


@pytest.mark.parametrize("template", UNSTABLE)
def test_template_that_is_not_prefix_stable_is_refused(tok, template):
    odd = Tokenizer(tok.backend, tok.config, chat_template=template)
    if "(old)" in template:
        assert render_example(odd, CHAT[:3]).num_loss_tokens > 0  # one assistant turn, rendered last: fine
    with pytest.raises(LmlabError, match="prefix-stable"):
        render_example(odd, CHAT)


def test_alpaca_records_give_the_same_tokens_as_chat(tok, tmp_path):
    alpaca = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "system": "Be exact."},
        {"instruction": "Name a prime number.", "input": "", "output": "Seven.", "id": 7},
    ]
    chat = [
        {"messages": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Translate to French.\n\nGood morning"},
            {"role": "assistant", "content": "Bonjour"},
        ], "source": "x"},
        {"messages": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "Seven."},
        ]},
    ]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n\n", encoding="utf-8")
    a, c = read_sft_jsonl(tmp_path / "a.jsonl"), read_sft_jsonl(tmp_path / "c.jsonl")
    assert a == c
    for x, y in zip(a, c):
        ex, ey = render_example(tok, x), render_example(tok, y)
        assert (ex.input_ids, ex.labels) == (ey.input_ids, ey.labels)
        assert ex.num_loss_tokens > 0


BAD = [
    ("{not json", None, "invalid JSON"),
    ('{"text": "hi"}', "messages", "needs 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "messages[0].role",
     "role must be"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "messages[0].content",
     "content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages", "no assistant turn"),
    ('{"instruction": "do it", "input": ""}', "output", "missing"),
    ('{"instruction": "do it", "input": 3, "output": "done"}', "input", "must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "field", "message"), BAD)
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, message):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(LmlabError, match=message) as info:
        read_sft_jsonl(path)
    e = info.value
    assert (e.file, e.line, e.field) == (str(path), 2, field)
    assert f"{path}:2: " in str(e)


# -- packing changes nothing but speed ------------------------------------------------------------

VOCAB = 512


def _examples(n: int, seed: int = 0, lo: int = 4, hi: int = 20) -> list[SFTExample]:
    """Random conversations: a prompt without loss, then a reply with loss; token 0 of example i is 100 + i."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        ids[0] = 100 + i
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(SFTExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@pytest.fixture(scope="module", params=["llama-tiny", "gpt2-tiny"])
def model(request) -> Transformer:
    """RoPE sees only relative positions; GPT-2's learned positions also catch positions that fail to restart."""
    torch.manual_seed(0)
    # a wide init so that a leak between documents would move the logits visibly
    return Transformer(ModelConfig.from_preset(request.param, vocab_size=VOCAB, init_std=0.2)).eval()


def _reference(model: Transformer, examples: list[SFTExample]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token-weighted mean loss of the examples run one at a time, and its gradients."""
    model.zero_grad()
    total, count = 0.0, 0
    for ex in examples:
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        logits = model(ids)
        total = total + F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
        count += int((labels[0, 1:] != IGNORE).sum())
    loss = total / count
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _grads(model: Transformer, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("pack", [True, False])
def test_batch_loss_and_grads_equal_examples_run_one_by_one(model, pack):
    examples = _examples(12)
    data = SFTDataset(examples, batch_size=12, block_size=48, pack=pack, seed=1)
    assert data.steps_per_epoch == 1  # one batch holds them all
    batch = data.get_batch(0)
    assert batch["input_ids"].shape[0] == 12
    if pack:
        assert data.stats().rows_per_epoch < 12  # several examples share rows
    ref_loss, ref_grads = _reference(model, examples)
    loss, grads = _grads(model, lambda: sft_loss(model, batch))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # without token_scale the loss is the plain token mean of the batch: the same number
    plain = {k: v for k, v in batch.items() if k != "token_scale"}
    torch.testing.assert_close(sft_loss(model, plain).detach(), ref_loss, atol=1e-5, rtol=1e-5)


def test_micro_batches_average_to_the_global_token_mean(model):
    # the Trainer averages micro-batch losses; token_scale makes that the mean over all tokens, however they split
    examples = _examples(16, seed=3, lo=3, hi=40)
    batch = SFTDataset(examples, batch_size=8, block_size=48, seed=0).get_batch(0)
    ref_loss, ref_grads = _reference(model, [examples[i] for r in _rows(batch) for i in r])

    def accumulated():
        return sum(sft_loss(model, split_batch(batch, 4, i)) for i in range(4)) / 4

    loss, grads = _grads(model, accumulated)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def _rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Example indices per row, read back from each document's first token (100 + index)."""
    rows = []
    for ids, docs in zip(batch["input_ids"], batch["document_ids"]):
        starts = [t for t in range(len(ids)) if docs[t] >= 0 and (t == 0 or docs[t] != docs[t - 1])]
        rows.append([int(ids[t]) - 100 for t in starts])
    return rows


@torch.no_grad()
def test_packed_documents_do_not_see_each_other(model):
    examples = _examples(6, seed=5)
    batch = SFTDataset(examples, batch_size=1, block_size=64, shuffle=False).get_batch(0)
    docs = batch["document_ids"][0]
    assert docs[0] == 0 and int(docs.max()) >= 1, "the row must hold several documents"
    kwargs = {k: batch[k] for k in ("position_ids", "document_ids")}
    logits = model(batch["input_ids"], **kwargs)
    changed = batch["input_ids"].clone()
    a = docs == 0
    changed[0, a] = (changed[0, a] * 7 + 3) % VOCAB  # rewrite every token of example A
    after = model(changed, **kwargs)
    assert not torch.allclose(logits[0, a], after[0, a], atol=1e-3)  # A itself did change
    assert torch.allclose(logits[0, ~a], after[0, ~a], atol=1e-6)  # B, C, ... and the padding did not
    # and each document's logits are those of the example run alone, from position 0
    for d in range(int(docs.max()) + 1):
        ex = examples[_rows(batch)[0][d]]
        torch.testing.assert_close(logits[0, docs == d], model(torch.tensor([ex.input_ids]))[0], atol=1e-5, rtol=1e-5)


def test_loss_never_crosses_a_document_boundary(model):
    # hand-made examples whose first token is (wrongly) labelled: the batch and the loss must both ignore it
    examples = [SFTExample([5, 6, 7], [5, 6, 7]), SFTExample([8, 9, 10, 11], [8, 9, 10, 11])]
    batch = SFTDataset(examples, batch_size=1, block_size=8, shuffle=False, global_token_mean=False).get_batch(0)
    assert batch["labels"][0].tolist() == [IGNORE, 6, 7, IGNORE, 9, 10, 11, IGNORE]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, -1]
    leaky = dict(batch, labels=torch.tensor([[5, 6, 7, 8, 9, 10, 11, IGNORE]]))
    torch.testing.assert_close(sft_loss(model, leaky), sft_loss(model, batch))


# -- order, epochs, truncation, resume ------------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
def test_batches_are_deterministic_and_cover_each_example_once_per_epoch(pack):
    examples = _examples(30, seed=7, lo=3, hi=30)
    data = SFTDataset(examples, batch_size=4, block_size=32, pack=pack, seed=11)
    again = SFTDataset(examples, batch_size=4, block_size=32, pack=pack, seed=11)
    orders = []
    start = 0
    for epoch in range(3):
        steps = data.steps_in_epoch(epoch)
        seen = []
        for step in range(start, start + steps):
            assert data.epoch(step) == epoch
            batch = data.get_batch(step)
            assert all(v.shape[0] == 4 for v in batch.values())
            for k, v in batch.items():
                assert torch.equal(v, again.get_batch(step)[k])  # a fresh dataset gives the same batch
            seen += [i for row in data.batch_examples(step) for i in row]
            if not pack:
                lengths = [sum(len(examples[i]) for i in row) for row in data.batch_examples(step)]
                assert batch["attention_mask"].sum(1).tolist() == lengths
                assert batch["input_ids"].shape[1] == max(lengths)  # padded to the batch's longest
            if pack:
                assert batch["input_ids"].shape[1] == 32
                assert [i for row in _rows(batch) for i in row] == [i for row in data.batch_examples(step) for i in row]
        assert sorted(seen) == list(range(30))  # each example exactly once
        orders.append(seen)
        start += steps
    assert data.steps_for_epochs(3) == start
    assert orders[0] != orders[1]  # each epoch has its own order
    assert torch.equal(data.get_batch(1)["input_ids"], again.get_batch(1)["input_ids"])  # going back works too
    if not pack:
        assert data.steps_per_epoch == 8  # ceil(30 / 4); the last batch ends with two empty rows
        assert data.batch_examples(7)[2:] == [[], []]


def test_truncation_is_counted_and_stats_add_up():
    examples = [*_examples(5, seed=2, lo=3, hi=10), SFTExample(list(range(1, 41)), [IGNORE] * 10 + list(range(11, 41)))]
    data = SFTDataset(examples, batch_size=2, block_size=16, shuffle=False)
    stats = data.stats()
    assert stats.truncated == 1 and stats.examples == 6
    assert stats.tokens == sum(min(len(e), 16) for e in examples)
    assert stats.assistant_tokens == sum(e.num_loss_tokens for e in data.examples)
    assert stats.assistant_tokens == sum(sum(label != IGNORE for label in e.labels[:16]) for e in examples)
    rows = stats.rows_per_epoch
    assert stats.packing_efficiency == pytest.approx(stats.tokens / (2 * stats.steps_per_epoch * 16))
    assert rows >= 2 and 0 < stats.packing_efficiency <= 1


def test_resume_state_checks_the_data():
    examples = _examples(10)
    data = SFTDataset(examples, batch_size=2, block_size=32, seed=3)
    state = json.loads(json.dumps(data.state_dict()))  # survives a JSON round trip
    SFTDataset(examples, batch_size=2, block_size=32, seed=3).load_state_dict(state)
    with pytest.raises(LmlabError, match="seed"):
        SFTDataset(examples, batch_size=2, block_size=32, seed=4).load_state_dict(state)
    with pytest.raises(LmlabError, match="fingerprint"):
        SFTDataset(examples[:-1], batch_size=2, block_size=32, seed=3).load_state_dict(state)


def test_build_sft_data_end_to_end(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    long = {"instruction": "Repeat. " * 80, "output": "No."}  # its reply falls beyond block_size
    records = [{"messages": CHAT}, {"instruction": "Say hi.", "output": "Hi!"}, long]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data, stats = build_sft_data(tok, path, block_size=96, batch_size=2, seed=0)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert data.pad_id == tok.pad_token_id
    batch = data.get_batch(0)
    assert batch["input_ids"].shape == (2, 96)
    labelled = batch["labels"][batch["labels"] != IGNORE]
    assert int((labelled == tok.eos_token_id).sum()) == 3  # three assistant turns, each ends with <|im_end|>
