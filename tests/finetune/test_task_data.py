"""Classification / NER data: readers and their errors, label maps, class weights, batches (aligned as transformers)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from lmlab.errors import LmlabError
from lmlab.eval.entities import bio_spans
from lmlab.finetune.task_data import (
    IGNORE_INDEX,
    ClassificationDataset,
    LabelMap,
    TokenClassificationDataset,
    class_weights,
    encode_truncated,
    ner_stats,
    read_classification_jsonl,
    read_ner_jsonl,
    resample_indices,
)
from lmlab.model.gguf import read_gguf_tokenizer
from lmlab.tokenizer.tokenizer import load_tokenizer

TEXTS = [
    "A man is eating food.",
    "一个男人在吃东西。",
    "ok",
    "The quick brown fox jumps over the lazy dog, again and again and again, until it is tired.",
    "Tokenization-heavy: don't, won't, 12345 €100 😀",
]
SENTENCES = [
    (["John", "Smithsonian", "lives", "in", "Zürich", "."], ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]),
    (["中", "国", "人", "民", "银", "行"], ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG"]),
    (["unbelievably", "long", "words", "everywhere"], ["O", "I-MISC", "O", "B-MISC"]),
    (["Hi"], ["O"]),
    (
        ["New", "York", "Times", "reporter", "2024", "visits", "北京"],
        ["B-ORG", "I-ORG", "I-ORG", "O", "O", "O", "B-LOC"],
    ),
]


@pytest.fixture(scope="module")
def bert(minilm_dir):
    return load_tokenizer(minilm_dir), transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def bpe(smollm2_gguf, tmp_path_factory):
    tok = read_gguf_tokenizer(smollm2_gguf)
    directory = tmp_path_factory.mktemp("smollm2_tok")
    tok.save(directory)
    return tok, transformers.AutoTokenizer.from_pretrained(directory)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines))
    return path


def _unpad(batch, key="input_ids"):
    return [row[: int(m.sum())].tolist() for row, m in zip(batch[key], batch["attention_mask"])]


# -- readers ---------------------------------------------------------------------------------------------------
def test_read_classification_jsonl(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"text": "good", "label": 1}, "", {"text": "bad", "label": "neg", "x": 0}])
    records = read_classification_jsonl(f)
    assert [(r["text"], r["label"], r["_line"]) for r in records] == [("good", "1", 1), ("bad", "neg", 3)]
    g = _write(tmp_path / "e.jsonl", [{"review": "fine", "stars": 5}])
    assert read_classification_jsonl(g, text_field="review", label_field="stars")[0]["label"] == "5"
    assert "label" not in read_classification_jsonl(g, text_field="review", label_field=None)[0]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"text": "a", "label": "x"}, "{not json"], r"d\.jsonl:2: invalid JSON"),
        ([{"text": "a"}], r"d\.jsonl:1: label: missing field"),
        ([{"text": "a", "label": 1.5}], r"d\.jsonl:1: label: expected str or int, got float"),
        ([{"text": "a", "label": True}], r"d\.jsonl:1: label: expected str or int, got bool"),
        ([{"text": 3, "label": "x"}], r"d\.jsonl:1: text: expected str, got int"),
        ([{"text": "  ", "label": "x"}], r"d\.jsonl:1: text: empty text"),
        (["[1, 2]"], r"d\.jsonl:1: expected a JSON object, got list"),
        ([""], r"d\.jsonl: no records in this file"),
    ],
)
def test_read_classification_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(LmlabError, match=message):
        read_classification_jsonl(_write(tmp_path / "d.jsonl", lines))


def test_read_classification_jsonl_rejects_bad_utf8_and_missing_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "x"}\n')
    with pytest.raises(LmlabError, match=r"d\.jsonl:2: not UTF-8"):
        read_classification_jsonl(f)
    with pytest.raises(LmlabError, match="no such file"):
        read_classification_jsonl(tmp_path / "missing.jsonl")


def test_read_ner_jsonl_token_format(tmp_path):
    f = _write(tmp_path / "n.jsonl", [{"tokens": t, "tags": g} for t, g in SENTENCES])
    records = read_ner_jsonl(f)
    assert [(r["tokens"], r["tags"]) for r in records] == [(list(t), list(g)) for t, g in SENTENCES]
    stats = ner_stats(records)
    # "I-MISC" after "O" in sentence 3 is accepted, counted as an entity start and reported
    assert stats["i_without_b"] == 1
    assert stats["entities"] == {"LOC": 2, "MISC": 2, "ORG": 2, "PER": 1}
    assert stats["sentences"] == 5 and stats["tokens"] == sum(len(t) for t, _ in SENTENCES)


def test_read_ner_jsonl_span_format_as_people_daily(tmp_path):
    # the shape data/registry.py's people-daily writes: character offsets, end exclusive
    text = "中共中央总书记江泽民在北京 发表讲话"
    entities = [
        {"start": 0, "end": 4, "type": "ORG", "text": "中共中央"},
        {"start": 7, "end": 10, "type": "PER", "text": "江泽民"},
        {"start": 11, "end": 13, "type": "LOC", "text": "北京"},
    ]
    f = _write(tmp_path / "p.jsonl", [{"text": text, "entities": entities}, {"text": "没有实体。", "entities": []}])
    first, second = read_ner_jsonl(f)
    assert "".join(first["tokens"]) == text.replace(" ", "")  # whitespace gets no token
    assert all(text[o] == c for o, c in zip(first["offsets"], first["tokens"]))
    spans = [(t, first["offsets"][s], first["offsets"][e - 1] + 1) for t, s, e in bio_spans(first["tags"])]
    assert spans == [(e["type"], e["start"], e["end"]) for e in entities]
    assert first["tags"][:5] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O"]
    assert second["tags"] == ["O"] * 5


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, r"n\.jsonl:1: tags: 1 tags for 2 tokens"),
        ({"tokens": ["a"], "tags": ["B-PER-"]}, None),  # a type may hold a dash: accepted
        ({"tokens": ["a"], "tags": ["PER"]}, r"n\.jsonl:1: tags: tag 0 is 'PER', not a BIO tag"),
        ({"tokens": ["a"], "tags": ["S-PER"]}, r"tag 0 is 'S-PER', not a BIO tag.*BIOES"),
        ({"tokens": ["a"], "tags": [0]}, r"tag 0 is 0, not a BIO tag"),
        ({"tokens": ["a", ""], "tags": ["O", "O"]}, r"tokens: token 1 is '', not a non-blank string"),
        ({"tokens": [], "tags": []}, r"tokens: empty token list"),
        ({"tokens": ["a"]}, r"n\.jsonl:1: tags: missing field"),
        ({"words": ["a"]}, r"n\.jsonl:1: neither 'tokens' nor 'text' is here"),
        ({"text": "abc"}, r"entities: missing field"),
        ({"text": "abc", "entities": [{"start": 0, "end": 4, "type": "X"}]}, r"entities\[0\]: span \[0, 4\) is not"),
        ({"text": "abc", "entities": [{"start": 1, "end": 1, "type": "X"}]}, r"span \[1, 1\) is not inside"),
        ({"text": "abc", "entities": [{"start": 0, "end": 2}]}, r"n\.jsonl:1: type: missing field"),
        ({"text": "abc", "entities": [{"start": 0, "end": 2, "type": "X", "text": "bc"}]}, r"is 'ab' but the entity"),
        (
            {"text": "abcd", "entities": [{"start": 2, "end": 4, "type": "X"}, {"start": 0, "end": 3, "type": "Y"}]},
            r"n\.jsonl:1: entities: entities 1 and 0 overlap",
        ),
        ({"text": "a  b", "entities": [{"start": 1, "end": 3, "type": "X"}]}, r"entity is only whitespace"),
    ],
)
def test_read_ner_jsonl_errors(tmp_path, obj, message):
    f = _write(tmp_path / "n.jsonl", [obj])
    if message is None:
        assert read_ner_jsonl(f)[0]["tags"] == obj["tags"]
        return
    with pytest.raises(LmlabError, match=message):
        read_ner_jsonl(f)


# -- labels, weights, resampling -------------------------------------------------------------------------------
def test_label_map_order_and_round_trip():
    records = [{"label": x} for x in ["10", "2", "0", "2"]]
    assert LabelMap.from_records(records).labels == ["0", "2", "10"]  # numeric when all are integers
    assert LabelMap.from_records(records[::-1]) == LabelMap.from_records(records)  # independent of record order
    assert LabelMap.from_records([{"label": x} for x in ["neg", "pos", "neu"]]).labels == ["neg", "neu", "pos"]
    ner = LabelMap.from_records([{"tokens": t, "tags": g} for t, g in SENTENCES])
    # O first; B- and I- for every type, even I-LOC that no sentence has
    assert ner.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert ner.is_bio and not LabelMap(["a", "b"]).is_bio
    assert LabelMap.from_id2label({"1": "b", "0": "a"}) == LabelMap(["a", "b"])
    assert ner.decode(ner.encode("I-LOC")) == "I-LOC"
    with pytest.raises(LmlabError, match="appears twice"):
        LabelMap(["a", "a"])
    with pytest.raises(LmlabError, match=r"ids must be 0\.\.1"):
        LabelMap.from_id2label({0: "a", 2: "b"})


def test_unknown_label_at_eval_names_file_and_line(tmp_path, bert):
    tok, _ = bert
    train = read_classification_jsonl(_write(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}]))
    val = read_classification_jsonl(_write(tmp_path / "val.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neu"}]))  # fmt: skip
    with pytest.raises(
        LmlabError, match=r"val\.jsonl:2: label 'neu' is not one of the 1 labels the model knows \(pos\)"
    ):
        ClassificationDataset(tok, val, LabelMap.from_records(train), batch_size=2)
    ner = read_ner_jsonl(_write(tmp_path / "n.jsonl", [{"tokens": ["x", "y"], "tags": ["O", "B-DATE"]}]))
    with pytest.raises(LmlabError, match=r"n\.jsonl:1: label 'B-DATE'"):
        TokenClassificationDataset(tok, ner, LabelMap(["O", "B-PER", "I-PER"]), batch_size=2)


def test_class_weights_by_hand():
    ids = [0] * 6 + [1] * 3 + [2] + [IGNORE_INDEX] * 4
    inverse = np.array([1 / 6, 1 / 3, 1.0])
    torch.testing.assert_close(class_weights(ids, 4), torch.tensor([*(inverse / inverse.mean()), 1.0]).float())
    sq = 1 / np.sqrt([6, 3, 1])
    torch.testing.assert_close(
        class_weights(torch.tensor(ids), 3, "sqrt_inverse"), torch.tensor(sq / sq.mean()).float()
    )
    beta = 0.999
    eff = (1 - beta) / (1 - beta ** np.array([6, 3, 1]))
    got = class_weights(np.array(ids), 3, "effective")
    torch.testing.assert_close(got, torch.tensor(eff / eff.mean()).float())
    assert got.mean().item() == pytest.approx(1.0)
    # inverse is proportional to scikit-learn's "balanced" weights
    from sklearn.utils.class_weight import compute_class_weight

    sk = compute_class_weight("balanced", classes=np.arange(3), y=np.array(ids[:10]))
    torch.testing.assert_close(class_weights(ids, 3), torch.tensor(sk / sk.mean()).float())
    with pytest.raises(LmlabError, match="unknown class weighting 'log'"):
        class_weights(ids, 3, "log")
    with pytest.raises(LmlabError, match="label id 2 is out of range for 2 labels"):
        class_weights(ids, 2)


def test_resample_indices():
    labels = np.array([0] * 7 + [1] * 2 + [2] * 3)
    over = resample_indices(labels, "oversample", seed=0)
    assert Counter(labels[over].tolist()) == {0: 7, 1: 7, 2: 7}
    assert set(over.tolist()) == set(range(12))  # every original example kept
    assert Counter(over.tolist())[7] in (3, 4)  # whole copies first, then a remainder: counts differ by at most 1
    under = resample_indices(labels, "undersample", seed=0)
    assert Counter(labels[under].tolist()) == {0: 2, 1: 2, 2: 2} and len(set(under.tolist())) == 6
    assert np.array_equal(under, resample_indices(labels, "undersample", seed=0))
    assert any(not np.array_equal(under, resample_indices(labels, "undersample", seed=s)) for s in range(1, 5))
    with pytest.raises(LmlabError, match="oversample or undersample"):
        resample_indices(labels, "smote")


# -- classification batches ------------------------------------------------------------------------------------
def _cls_records(n=11):
    return [{"text": f"{TEXTS[i % len(TEXTS)]} #{i}", "label": "pos" if i % 4 == 0 else "neg"} for i in range(n)]


@pytest.mark.parametrize("which", ["bert", "bpe"])
def test_classification_batches_match_transformers(which, request):
    tok, theirs = request.getfixturevalue(which)
    records = [{"text": t, "label": str(i % 2)} for i, t in enumerate(TEXTS)]
    ds = ClassificationDataset(tok, records, LabelMap(["0", "1"]), batch_size=5, max_len=12, shuffle=False)
    batch = ds.get_batch(0)
    want = theirs(TEXTS, truncation=True, max_length=12)
    assert _unpad(batch) == want.input_ids
    assert ds.truncated == sum(len(x) == 12 for x in want.input_ids) > 0
    assert batch["labels"].tolist() == [0, 1, 0, 1, 0]
    assert all(v.dtype == torch.long for v in batch.values())
    if which == "bert":  # [CLS] ... [SEP], token types, [PAD] = 0
        assert batch["token_type_ids"].abs().sum() == 0 and batch["input_ids"][2, 0] == tok.token_id("[CLS]")
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    else:  # no post-processor: nothing added; pad falls back to <|im_end|>
        assert "token_type_ids" not in batch
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert batch["input_ids"].shape[1] == max(map(len, want.input_ids))  # padded to the longest row only
    padded = ClassificationDataset(tok, records, LabelMap(["0", "1"]), 8, max_len=12, pad_to_max_len=True)
    assert padded.get_batch(0)["input_ids"].shape == (8, 12)  # 5 records, 8 rows: a batch runs into the next epoch


def test_classification_epochs_are_permutations_and_steps_are_deterministic(bert):
    tok, _ = bert
    records = _cls_records(11)
    ds = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=4, seed=3)
    assert len(ds) == 11 and ds.steps_per_epoch == 3
    stream = [i for step in range(11) for i in ds.indices(step)]  # 44 positions = 4 epochs exactly
    epochs = [stream[k * 11 : (k + 1) * 11] for k in range(4)]
    assert all(sorted(e) == list(range(11)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # a fresh permutation each epoch
    again = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=4, seed=3)
    for step in (7, 0, 5):  # any step, any order: the same batch
        a, b = ds.get_batch(step), again.get_batch(step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=4, seed=4)
    assert [other.indices(s) for s in range(3)] != [ds.indices(s) for s in range(3)]
    # labels follow the rows they belong to
    label_ids = [ds.label_map.encode(r["label"]) for r in records]
    assert ds.get_batch(5)["labels"].tolist() == [label_ids[i] for i in ds.indices(5)]
    plain = ClassificationDataset(tok, records, ds.label_map, batch_size=4, shuffle=False)
    assert [plain.indices(s) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]


def test_balanced_sampling_evens_out_each_epoch(bert):
    tok, _ = bert
    records = _cls_records(12)  # 3 pos, 9 neg
    ds = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=6, sampling="balanced")
    assert ds.epoch_length == 18 and ds.steps_per_epoch == 3
    labels = [int(ds.get_batch(s)["labels"].sum()) for s in range(6)]  # "pos" has id 1
    assert sum(labels[:3]) == 9 and sum(labels[3:]) == 9  # 9 of each class per epoch


def test_state_dict_and_eval_iteration(bert):
    tok, _ = bert
    records = _cls_records(11)
    ds = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=4)
    first = [ds.get_batch() for _ in range(3)]
    state = ds.state_dict()
    resumed = ClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=4)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.get_batch()["input_ids"], ds.get_batch()["input_ids"])
    assert torch.equal(first[1]["input_ids"], ds.get_batch(1)["input_ids"])
    with pytest.raises(LmlabError, match="resume state has batch_size=4, this dataset has 5"):
        ClassificationDataset(tok, records, ds.label_map, batch_size=5).load_state_dict(state)
    batches = list(ds.iter_eval(batch_size=4))
    assert [len(b["labels"]) for b in batches] == [4, 4, 3]
    assert [r for b in batches for r in _unpad(b)] == [
        e.ids for e in encode_truncated(tok, [r["text"] for r in records], 128)[0]
    ]
    unlabelled = ClassificationDataset(tok, [{"text": r["text"]} for r in records], None, batch_size=4)
    assert "labels" not in unlabelled.get_batch(0)
    with pytest.raises(LmlabError, match="missing field"):
        ClassificationDataset(tok, [*records, {"text": "x"}], ds.label_map, batch_size=4)


# -- token classification --------------------------------------------------------------------------------------
def _hf_labels(word_ids, tags, label_map):
    """transformers' run_ner alignment: first sub-token of each word gets its tag, everything else -100."""
    out, prev = [], None
    for w in word_ids:
        out.append(label_map.encode(tags[w]) if w is not None and w != prev else -100)
        prev = w
    return out


@pytest.mark.parametrize("which", ["bert", "bpe"])
@pytest.mark.parametrize("max_len", [64, 7])
def test_token_classification_alignment_matches_transformers(which, max_len, request):
    tok, theirs = request.getfixturevalue(which)
    records = [{"tokens": list(t), "tags": list(g)} for t, g in SENTENCES]
    label_map = LabelMap.from_records(records)
    ds = TokenClassificationDataset(tok, records, label_map, batch_size=5, max_len=max_len, shuffle=False)
    batch = ds.get_batch(0)
    want = theirs([r["tokens"] for r in records], is_split_into_words=True, truncation=True, max_length=max_len)
    assert _unpad(batch) == want.input_ids
    for i, r in enumerate(records):
        assert ds.word_ids[i] == want.word_ids(i)
        assert _unpad(batch, "labels")[i] == _hf_labels(want.word_ids(i), r["tags"], label_map)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert ds.labels.tolist() == [x for row in _unpad(batch, "labels") for x in row]  # flat, for class_weights
    cut = [len(r["tokens"]) - 1 - max(w for w in want.word_ids(i) if w is not None) for i, r in enumerate(records)]
    assert ds.truncated_words == sum(cut) and ds.truncated == sum(len(x) == max_len for x in want.input_ids)
    assert (ds.truncated > 0) == (max_len == 7)
    # predictions map back to one tag per word: feeding the gold labels back gives the gold tags (cut words: O)
    expected = []
    for i, r in enumerate(records):
        kept = max(w for w in ds.word_ids[i] if w is not None) + 1
        expected.append(r["tags"][:kept] + ["O"] * (len(r["tokens"]) - kept))
        assert ds.word_tags(i, batch["labels"][i].clamp(min=0).tolist()) == expected[i]
    preds = [b["labels"].clamp(min=0) for b in ds.iter_eval(batch_size=2)]
    assert ds.predicted_tags(preds) == expected
    with pytest.raises(LmlabError, match="predictions cover 4 examples, the dataset has 5"):
        ds.predicted_tags(preds[:2])


def test_token_classification_on_people_daily_spans(tmp_path, bert):
    tok, _ = bert
    text = "江泽民在北京发表讲话"
    f = _write(tmp_path / "p.jsonl", [{"text": text, "entities": [{"start": 0, "end": 3, "type": "PER"}, {"start": 4, "end": 6, "type": "LOC"}]}])  # fmt: skip
    records = read_ner_jsonl(f)
    ds = TokenClassificationDataset(tok, records, LabelMap.from_records(records), batch_size=1, shuffle=False)
    labels = ds.get_batch(0)["labels"][0].tolist()
    names = [ds.label_map.decode(x) if x != IGNORE_INDEX else None for x in labels]
    # BERT splits Chinese into characters: one token per character between [CLS] and [SEP]
    assert names == [None, "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O", "O", "O", None]
    with pytest.raises(LmlabError, match="sampling='uniform' only"):
        TokenClassificationDataset(tok, records, ds.label_map, batch_size=1, sampling="balanced")
