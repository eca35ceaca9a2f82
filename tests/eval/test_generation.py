"""generate_until tasks: predictions are lmlab.generate's, scores are the metrics', compare pairs the examples."""

from __future__ import annotations

import json

import pytest
import yaml

import lmlab
from lmlab.errors import LmlabError
from lmlab.eval.bootstrap import bootstrap_se
from lmlab.eval.harness import run_generation, task_docs
from lmlab.eval.metrics import bleu, chrf, exact_match, rouge, token_f1
from lmlab.eval.report import compare, format_markdown
from lmlab.eval.scoring import score_generations
from lmlab.eval.tasks import GENERATION_METRICS, GenerationTask, load_task
from tests.eval.test_metrics import HYPS, REFS

DOCS = [
    {"q": "What jumps over the lazy dog?", "a": "The quick brown fox.", "kind": "animals"},
    {"q": "What is the capital of France?", "a": "Paris, the city of light.", "kind": "places"},
    {"q": "What do astronomers study?", "a": "Stars, planets and galaxies.", "kind": "science"},
    {"q": "Two plus two equals?", "a": "Four.", "kind": "science"},
    {"q": "Three times three?", "a": "Nine, of course.", "kind": "science"},
]
SPEC = {
    "name": "qa",
    "output_type": "generate_until",
    "dataset": "docs.jsonl",
    "doc_to_text": "Question: {{ q }}\nAnswer:",
    "doc_to_target": "{{ a }}",
    "until": ["\n\n"],
    "max_new_tokens": 12,
    "metrics": list(GENERATION_METRICS),
}


def write_task(tmp_path, docs=DOCS, **changes) -> GenerationTask:
    """A generation task file next to its JSONL data; changes with value None remove a field."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {**SPEC, **changes}
    spec = {k: v for k, v in spec.items() if v is not None}
    p = tmp_path / "qa.yaml"
    p.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return p


def test_predictions_equal_generate_called_directly(tiny_pair, tmp_path):
    model, tok, _, _ = tiny_pair
    task = load_task(write_task(tmp_path))
    docs = task_docs(task, task.split)
    r = run_generation(model, tok, task, docs, batch_size=3, n_boot=20)  # batches sorted by length: [1, 2, 3], [4, 0]
    prompts = [f"Question: {d['q']}\nAnswer:" for d in docs]
    assert [rec["prompt"] for rec in r["records"]] == prompts
    direct = lmlab.generate(model, tok, prompts, max_new_tokens=12, temperature=0.0, stop=["\n\n"])
    assert [rec["prediction"] for rec in r["records"]] == [g.text.strip() for g in direct]
    for p in prompts[:2]:  # and one prompt alone, with no padding at all
        alone = lmlab.generate(model, tok, [p], max_new_tokens=12)[0].text.strip()
        assert next(rec["prediction"] for rec in r["records"] if rec["prompt"] == p) == alone
    assert all(rec["references"] == [d["a"]] and rec["doc"] == d for rec, d in zip(r["records"], docs))
    assert any(rec["prediction"] for rec in r["records"])


def test_records_equal_the_metrics_and_sacrebleu(tiny_pair, tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    model, tok, _, _ = tiny_pair
    task = load_task(write_task(tmp_path))
    r = run_generation(model, tok, task, task_docs(task, task.split), batch_size=3, n_boot=20)
    preds = [rec["prediction"] for rec in r["records"]]
    refs = [d["a"] for d in DOCS]
    for rec, p, ref in zip(r["records"], preds, refs):
        assert rec["exact_match"] == exact_match(p, ref) and rec["token_f1"] == token_f1(p, ref)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert rec[k] == rouge(p, ref)[k]["fmeasure"]
        assert rec["bleu"] == pytest.approx(sacrebleu.corpus_bleu([p], [[ref]]).score, abs=1e-9)
        assert rec["chrf"] == pytest.approx(sacrebleu.corpus_chrf([p], [[ref]]).score, abs=1e-9)
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    assert r["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-9) and r["chrf"] > 0
    assert r["token_f1"] == pytest.approx(sum(token_f1(p, ref) for p, ref in zip(preds, refs)) / len(refs))
    assert set(r) >= {f"{m}_se" for m in GENERATION_METRICS} and r["n"] == 5


def test_score_generations_multi_reference_and_corpus_bootstrap():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = [[r, h[::-1]] if i % 2 else [r] for i, (h, r) in enumerate(zip(HYPS, REFS))]  # one or two references
    r = score_generations(HYPS, refs, n_boot=50)
    second = [x[1] if len(x) > 1 else None for x in refs]
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, second]).score, abs=1e-9)
    assert r["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS, second]).score, abs=1e-9)
    for rec, h, rs in zip(r["records"], HYPS, refs):  # sentence metrics take the best reference
        assert rec["token_f1"] == max(token_f1(h, x) for x in rs)
        assert rec["rougeL"] == max(rouge(h, x)["rougeL"]["fmeasure"] for x in rs)
    # the corpus SE resamples examples and recomputes the corpus score (summed statistics give the same numbers)
    pairs = list(zip(HYPS, refs))
    for name, fn in (("bleu", bleu), ("chrf", chrf)):
        direct = bootstrap_se(pairs, lambda ps, fn=fn: fn([h for h, _ in ps], [x for _, x in ps]), n_boot=50)
        assert r[f"{name}_se"] == pytest.approx(direct, rel=1e-9) and direct > 0
    only = score_generations(HYPS, REFS, metrics=["chrf", "rougeL"], n_boot=10)
    assert only["metrics"] == ["chrf", "rougeL"] and "bleu" not in only and "bleu" not in only["records"][0]


def test_stop_strings_cut_predictions(tiny_pair, tmp_path):
    model, tok, _, _ = tiny_pair
    free = run_generation(model, tok, load_task(write_task(tmp_path, until=[])), DOCS[:3], n_boot=10)
    text = next(rec["prediction"] for rec in free["records"] if len(rec["prediction"]) > 6)
    stop = text[4:6]  # occurs in the free-running output, so the stopped run must end before it
    cut = run_generation(model, tok, load_task(write_task(tmp_path, until=[stop])), DOCS[:3], n_boot=10)
    for a, b in zip(free["records"], cut["records"]):
        raw = a["prediction"]
        expected = raw[: raw.index(stop)].strip() if stop in raw else raw
        assert b["prediction"] == expected and stop not in b["prediction"]
        assert b["new_tokens"] <= a["new_tokens"]
    assert any(stop in a["prediction"] for a in free["records"])


class BosTokenizer:
    """The tiny tokenizer, adding a BOS token when asked for special tokens (as Llama's does)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.tok.bos_token_id] * add_special_tokens + self.tok.encode(text, add_special_tokens=False)


def test_chat_template_and_fewshot_turns(tiny_pair, tmp_path):
    model, tok, _, _ = tiny_pair
    tok = BosTokenizer(tok)
    task = load_task(write_task(tmp_path, use_chat_template=True, description="Answer briefly."))
    shots = task.fewshot(DOCS[0], DOCS, 2)
    assert len(shots) == 2 and DOCS[0] not in shots
    messages = [{"role": "system", "content": "Answer briefly."}]
    for s in shots:
        messages += [
            {"role": "user", "content": f"Question: {s['q']}\nAnswer:"},
            {"role": "assistant", "content": s["a"]},
        ]
    messages.append({"role": "user", "content": f"Question: {DOCS[0]['q']}\nAnswer:"})
    expected = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert task.context(DOCS[0], shots, tok) == expected
    r = run_generation(model, tok, task, DOCS[:1], fewshot_pool=DOCS, num_fewshot=2, n_boot=10)
    ids = tok.encode(expected, add_special_tokens=False)  # the template already holds the special tokens
    assert r["records"][0]["prompt"] == expected and r["records"][0]["prompt_tokens"] == len(ids)
    g = lmlab.generate(model, tok, [ids], max_new_tokens=12, stop=["\n\n"])[0]
    assert r["records"][0]["prediction"] == g.text.strip()


def test_merge_same_prompt_where_and_fewshot_exclusion(tmp_path):
    docs = [*DOCS, {"q": DOCS[1]["q"], "a": "Paris.", "kind": "places"}, {"q": "Hi", "a": "Hello", "kind": "x"}]
    task = load_task(write_task(tmp_path, docs, merge_same_prompt=True, where={"kind": ["places", "science"]}))
    got = task_docs(task, task.split)
    assert [task.doc_references(d) for d in got] == [
        ["Paris, the city of light.", "Paris."],
        ["Stars, planets and galaxies."],
        ["Four."],
        ["Nine, of course."],
    ]
    pool = [{"q": DOCS[1]["q"], "a": "Lutetia."}, {"q": "Other?", "a": "Yes."}]
    assert task.fewshot(got[0], pool, 2) == [pool[1]]  # the same question would hand over its answer
    listed = load_task(write_task(tmp_path, doc_to_target="{{ [a, 'x'] | tojson }}"))
    assert listed.doc_references(DOCS[0]) == ["The quick brown fox.", "x"]
    missing = load_task(write_task(tmp_path, where={"lang": "en"}))
    with pytest.raises(LmlabError) as e:
        task_docs(missing, missing.split)
    assert e.value.field == "where" and e.value.file == str(tmp_path / "qa.yaml")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"metrics": ["exact_match", "meteor"]}, "metrics"),
        ({"metrics": []}, "metrics"),
        ({"doc_to_target": None}, "doc_to_target"),
        ({"doc_to_text": None}, "doc_to_text"),
        ({"until": [""]}, "until"),
        ({"until": 3}, "until"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"use_chat_template": "yes"}, "use_chat_template"),
        ({"prompt": "an MC field"}, "prompt"),
        ({"output_type": "generate"}, "output_type"),
        ({"where": "lang=en"}, "where"),
        ({"doc_to_target": "{{ a "}, "doc_to_target"),
    ],
)
def test_malformed_generation_task_names_file_and_field(tmp_path, changes, field):
    p = write_task(tmp_path, **changes)
    with pytest.raises(LmlabError) as e:
        load_task(p)
    assert e.value.file == str(p) and e.value.field == field
    assert str(p) in str(e.value) and field in str(e.value)


def test_chat_template_without_one_names_the_field(tmp_path):
    import types

    task = load_task(write_task(tmp_path, use_chat_template=True))
    with pytest.raises(LmlabError) as e:
        task.context(DOCS[0], [], types.SimpleNamespace(chat_template=None, apply_chat_template=None))
    assert e.value.field == "use_chat_template" and "false" in str(e.value)


def results_of(task_result: dict) -> dict:
    return {"config": {"model": "m", "tasks": ["qa"], "limit": None, "num_fewshot": 0}, "model_hash": "0" * 64,
            "tasks": {"qa": task_result}}  # fmt: skip


def test_compare_and_report_on_generation_results(tiny_pair, tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    model, tok, _, _ = tiny_pair
    task = load_task(write_task(tmp_path, group_by="kind"))
    a = run_generation(model, tok, task, DOCS, n_boot=20)
    refs = [d["a"] for d in DOCS]
    b = score_generations([r if i else "wrong" for i, r in enumerate(refs)], refs, task.metrics, n_boot=20)
    b["output_type"] = "generate_until"  # B answers four of five exactly
    rows = {r["metric"]: r for r in compare(results_of(a), results_of(b), n_boot=200)}
    assert set(rows) == set(GENERATION_METRICS)
    for m, row in rows.items():
        assert row["a"] == pytest.approx(a[m]) and row["b"] == pytest.approx(b[m]), m
        assert row["diff"] > 0 and row["ci_low"] <= row["diff"] <= row["ci_high"], m
    assert rows["exact_match"]["b"] == 0.8 and rows["chrf"]["ci_low"] > 0
    preds = [r["prediction"] for r in a["records"]]
    assert rows["bleu"]["a"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    same = {r["metric"]: r for r in compare(results_of(a), results_of(a), n_boot=50)}
    assert all(r["diff"] == 0 and r["ci_low"] == r["ci_high"] == 0 for r in same.values())
    other = score_generations(refs, [r + "!" for r in refs], task.metrics, n_boot=10) | {
        "output_type": "generate_until"
    }
    with pytest.raises(LmlabError, match="different examples"):
        compare(results_of(a), results_of(other))
    text = format_markdown(results_of(a))
    assert "| qa | chrf |" in text and "| qa | bleu |" in text and "## qa by group" in text
    assert "| science | 3 |" in text and "## qa: first 5 examples" in text
    assert a["by_group"]["science"]["chrf"] == pytest.approx(
        chrf([r["prediction"] for r in a["records"][2:]], refs[2:])
    )


def test_shipped_generation_tasks_render_the_fetched_records():
    poem = {"text": "《春晓》\n作者：孟浩然\n其一\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
            "title": "春晓", "author": "孟浩然", "collection": "tang300"}  # fmt: skip
    tang = load_task("tang-poems")
    assert tang.context(poem, []) == "《春晓》\n作者：孟浩然\n春眠不觉晓，处处闻啼鸟。\n"
    assert tang.doc_references(poem) == ["夜来风雨声，花落知多少。"] and tang.until == ["\n\n"]
    long = {**poem, "text": "《题》\n作者：某\n一一，\n二二，\n三三，\n四四，\n五五。"}
    assert tang.doc_references(long) == ["二二，\n三三，\n四四，"]  # the rest of the poem, at most three lines
    chat = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}], "lang": "zh",
            "category": "greetings"}  # fmt: skip
    for name, lang in (("chatterbot-en", "en"), ("chatterbot-zh", "zh")):
        task = load_task(name)
        assert isinstance(task, GenerationTask) and task.where == {"lang": lang} and task.use_chat_template
        assert task.doc_text(chat) == "你好" and task.doc_references(chat) == ["你好!"]
        assert task.select([chat, {**chat, "lang": "xx"}]) == (
            [{**chat, "_references": ["你好!"]}] if lang == "zh" else []
        )


def test_long_prompt_keeps_its_end_and_room_for_the_answer(tiny_pair, tmp_path):
    model, tok, _, _ = tiny_pair
    budget = model.cfg.max_seq_len - 8
    doc = {"q": "The quick brown fox jumps over the lazy dog. " * 40, "a": "dog"}
    r = run_generation(model, tok, load_task(write_task(tmp_path, max_new_tokens=8)), [doc], n_boot=10)
    ids = tok.encode(r["records"][0]["prompt"])
    assert len(ids) > budget and r["records"][0]["truncated"] and r["records"][0]["prompt_tokens"] == budget
    direct = lmlab.generate(model, tok, [ids[-budget:]], max_new_tokens=8, stop=["\n\n"])[0]
    assert r["records"][0]["prediction"] == direct.text.strip()
