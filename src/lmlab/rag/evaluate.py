"""`lmlab rag eval`: retrieval (recall@k, MRR, nDCG per mode), answers with and without retrieval and against an
extractive baseline (exact match, token F1), citation precision/recall (support proxies, validated on hand labels),
abstention (AUROC, accuracy at a dev-tuned threshold, coverage/accuracy curve); results.json, report.md, PNGs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError
from lmlab.eval.bootstrap import bootstrap_se, paired_bootstrap
from lmlab.eval.metrics import _squad_normalize, exact_match, token_f1
from lmlab.finetune.task_data import iter_jsonl
from lmlab.rag.ground import (
    SupportChecker,
    answer_question,
    best_sentence,
    clean_citations,
)
from lmlab.rag.retrieve import MODES
from lmlab.utils.atomic import write_json, write_text

KS = (1, 5, 10)
CLOSED_BOOK = [{"role": "system", "content": "Answer the question briefly."}]


def read_qa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """QA rows {question, answers: [...], doc_ids: [...]}; an empty `answers` list marks an unanswerable question."""
    rows = []
    for n, obj in iter_jsonl(path):
        for name, kind in (("question", str), ("answers", list), ("doc_ids", list)):
            if not isinstance(obj.get(name), kind):
                raise LmlabError(f"expected a {kind.__name__}", file=str(path), line=n, field=name)
        rows.append(obj)
    if not rows:
        raise LmlabError("no questions in this file", file=str(path))
    return rows


# -- metrics ---------------------------------------------------------------------------------------------
def ranked_docs(doc_ids: Sequence[str]) -> list[str]:
    """Documents in the order their first chunk was retrieved (several chunks of one page count once)."""
    return list(dict.fromkeys(doc_ids))


def retrieval_scores(doc_ids: Sequence[str], relevant: Sequence[str], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k (share of relevant pages among the first k chunks' pages), MRR and nDCG@max(k), binary relevance."""
    rel = set(relevant)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = len(rel & set(doc_ids[:k])) / len(rel)
    docs = ranked_docs(doc_ids[: max(ks)])
    first = next((i for i, d in enumerate(docs, 1) if d in rel), None)
    out["mrr"] = 1.0 / first if first else 0.0
    dcg = sum(1 / math.log2(i + 1) for i, d in enumerate(docs, 1) if d in rel)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(rel), max(ks)) + 1))
    out[f"ndcg@{max(ks)}"] = dcg / ideal
    return out


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def tune_threshold(scores: Sequence[float], answerable: Sequence[int]) -> float:
    """The cut that best separates answerable (>= cut: answer) from unanswerable (< cut: abstain) questions."""
    s = sorted(set(scores))
    cuts = [s[0] - 1e-6] + [(a + b) / 2 for a, b in itertools.pairwise(s)] + [s[-1] + 1e-6]
    acc = [np.mean([(x >= c) == bool(y) for x, y in zip(scores, answerable)]) for c in cuts]
    return float(cuts[int(np.argmax(acc))])


# reST and Markdown code markup: ":mod:`json`", "``json.dumps``", "`json`". SQuAD normalization deletes
# punctuation without a space, so ":class:`json`" became "classjson" and a correct answer scored 0; answers quote
# the sources' markup, so the markup goes first (for every system alike, and for the gold answers)
_ROLE = re.compile(r":[\w.+-]+:`([^`]*)`")


def strip_markup(text: str) -> str:
    """Text with reST roles reduced to their target and backquotes made spaces, before SQuAD normalization."""
    return _ROLE.sub(r" \1 ", text).replace("`", " ")


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalized gold answer appears in the normalized prediction (for sentence-long answers)."""
    p = f" {_squad_normalize(strip_markup(prediction))} "
    gold = [_squad_normalize(strip_markup(a)) for a in answers]
    return float(any(f" {g} " in p for g in gold if g))


def answer_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Exact match, token F1 and containment against the best of several gold answers (markup stripped first)."""
    prediction, answers = strip_markup(prediction), [strip_markup(a) for a in answers]
    return {
        "em": max(exact_match(prediction, a) for a in answers),
        "f1": max(token_f1(prediction, a) for a in answers),
        "contains": contains_answer(prediction, answers),
    }


def coverage_curve(confidence: Sequence[float], correct: Sequence[float]) -> list[dict[str, float]]:
    """Answer the most confident questions first: accuracy among those answered at each coverage."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    c = np.asarray(correct, dtype=np.float64)[order]
    n = len(c)
    return [{"coverage": (i + 1) / n, "accuracy": float(c[: i + 1].mean())} for i in range(n)]


def _mean_se(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)) if len(values) else float("nan"), "se": bootstrap_se(list(values))}


def validate_support(checker: SupportChecker, labels_path: str | os.PathLike) -> dict[str, Any]:
    """The support proxy against hand labels: accuracy, precision and recall of 'supported'."""
    rows = [obj for _, obj in iter_jsonl(labels_path)]
    scored = checker.scores([r["sentence"] for r in rows], [[r["source"]] for r in rows])
    pred = [checker.supported(lex, sem) for lex, sem in scored]
    gold = [bool(r["supported"]) for r in rows]
    tp = sum(p and g for p, g in zip(pred, gold))
    return {
        "n": len(rows),
        "accuracy": float(np.mean([p == g for p, g in zip(pred, gold)])),
        "accuracy_se": bootstrap_se([float(p == g) for p, g in zip(pred, gold)]),
        "proxy_precision": tp / max(1, sum(pred)),
        "proxy_recall": tp / max(1, sum(gold)),
        "auroc": auroc([max(lex, sem) for lex, sem in scored], gold),
    }


# -- the run ---------------------------------------------------------------------------------------------
def evaluate_rag(
    index_path: str | os.PathLike,
    qa_path: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    dev_path: str | os.PathLike | None = None,
    k: int = 5,
    generate_k: int = 3,
    limit: int | None = None,
    labels_path: str | os.PathLike | None = None,
    save_threshold: bool = False,
    consistency: int = 0,
    replay: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate retrieval, answers, citations and abstention on `qa_path`; write results.json, report.md and PNGs.

    model None: retrieval, abstention and the extractive baseline only; else the chat model answers `limit`
    evenly spaced questions with retrieval (`generate_k` sources) and without; with `consistency` N > 0 the
    SelfCheck detector scores each closed-book answer from N samples (AUROC against the answer being wrong). dev_path: questions to tune the abstention
    threshold on (else it is tuned on the evaluation questions themselves and the report says so).
    replay: an earlier run's results.json; its generations (greedy drafts with and without retrieval, and the
    detector's samples) are re-scored with the current retrieval, support check and metrics, no model loaded.
    """
    from lmlab.rag.ask import Asker

    t0 = time.time()
    rows = read_qa(qa_path)
    dev = read_qa(dev_path) if dev_path else None
    stored = _stored_generations(replay) if replay else None
    if stored is not None:
        model = stored["model"]
    asker = Asker(index_path, None if stored is not None else model)
    if stored is not None:
        asker.generator = _Replay(stored["records"])
    retriever, checker = asker.retriever, asker.checker
    records: list[dict[str, Any]] = []
    for row in rows:
        rec: dict[str, Any] = {"question": row["question"], "answers": row["answers"], "doc_ids": row["doc_ids"],
                               "type": row.get("type", ""), "answerable": bool(row["answers"])}  # fmt: skip
        for mode in MODES:
            # the k best are the first k of the max(k, KS) best: one search per mode serves both
            found = retriever.search(row["question"], max(k, *KS), mode)
            hits = found[: max(KS)]
            rec[f"retrieved_{mode}"] = [h.doc_id for h in hits]
            if row["answers"] and row["doc_ids"]:
                rec[mode] = retrieval_scores([h.doc_id for h in hits], row["doc_ids"])
            if mode == "hybrid":
                hybrid = found
        hits = hybrid[:k]
        rec["confidence"] = max(retriever.relevance(row["question"], hits), default=0.0)
        sentence, _ = best_sentence(row["question"], hits[:generate_k], checker.encoder)
        rec["extract"] = sentence
        records.append(rec)
    # abstention threshold: tuned on dev questions (confidence of the same kind), applied to these
    if dev is not None:
        dev_conf = []
        for row in dev:
            hits = retriever.search(row["question"], k, "hybrid")
            dev_conf.append(max(retriever.relevance(row["question"], hits), default=0.0))
        threshold = tune_threshold(dev_conf, [bool(r["answers"]) for r in dev])
    else:
        threshold = tune_threshold([r["confidence"] for r in records], [r["answerable"] for r in records])
    if save_threshold:
        asker.index.set_meta("abstain_threshold", threshold)
    # answers with a language model, for the first `limit` questions
    gen_records = records[:: max(1, len(records) // limit)][:limit] if limit else records  # evenly spaced: every type
    if asker.generator is not None:
        for rec in gen_records:
            if stored is not None:
                asker.generator.question = rec["question"]
            g = answer_question(rec["question"], retriever, asker.generator, checker, generate_k, "hybrid", -1.0)
            rec["rag_draft"] = g.draft
            rec["rag_answer"] = clean_citations(g.draft, len(g.sources))[0]
            rec["rag_abstained"], rec["rag_reason"] = g.abstained, g.abstain_reason
            rec["support"] = [{"text": s.text, "cited": s.cited, "lexical": s.lexical, "semantic": s.semantic,
                               "supported": s.supported, "added": s.added} for s in g.support]  # fmt: skip
            rec["sources"] = [s["text"] for s in g.sources]
            rec["closed_book"] = asker.generator([*CLOSED_BOOK, {"role": "user", "content": rec["question"]}])
    results = {
        "config": {
            "index": str(index_path),
            "qa": str(qa_path),
            "dev": str(dev_path) if dev_path else None,
            "model": model,
            "k": k,
            "generate_k": generate_k,
            "limit": limit,
            "replay": str(replay) if replay else None,
            "encoder": asker.index.meta["encoder"],
            "chunks": asker.index.counts()[1],
        },
        "n_questions": len(rows),
        "n_answerable": sum(r["answerable"] for r in records),
        "retrieval": _retrieval_summary(records),
        "abstention": _abstention_summary(records, threshold, dev is not None),
        "answers": _answer_summary(records, gen_records, asker.generator is not None),
        "seconds": 0.0,
        "records": records,
    }
    if asker.generator is not None:
        results["citations"] = _citation_summary(gen_records, checker)
    if asker.generator is not None and consistency > 0:
        results["detector"] = _detector(asker, gen_records, consistency, stored)
    if labels_path:
        results["support_validation"] = validate_support(checker, labels_path)
    results["seconds"] = round(time.time() - t0, 1)
    write_report(results, out)
    return results


def _retrieval_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if "hybrid" in r]
    out: dict[str, Any] = {"n": len(scored)}
    for mode in MODES:
        out[mode] = {m: _mean_se([r[mode][m] for r in scored]) for m in scored[0][mode]} if scored else {}
    if scored:
        for other in ("bm25", "dense"):
            a = [r[other]["recall@5"] for r in scored]
            b = [r["hybrid"]["recall@5"] for r in scored]
            out[f"hybrid_minus_{other}_recall@5"] = paired_bootstrap(a, b)
    return out


def _abstention_summary(records: list[dict[str, Any]], threshold: float, tuned_on_dev: bool) -> dict[str, Any]:
    conf = [r["confidence"] for r in records]
    ans = [int(r["answerable"]) for r in records]
    correct = [r["answerable"] and contains_answer(r["extract"], r["answers"]) for r in records]
    acc = [float((c >= threshold) == bool(a)) for c, a in zip(conf, ans)]
    curve = coverage_curve(conf, correct)
    return {
        "auroc": auroc(conf, ans),
        "auroc_se": bootstrap_se(list(zip(conf, ans)), lambda xs: auroc([c for c, _ in xs], [a for _, a in xs]), 200),
        "threshold": threshold,
        "threshold_tuned_on": "dev" if tuned_on_dev else "these questions (no --dev given)",
        "accuracy": _mean_se(acc),
        "n_unanswerable": len(ans) - sum(ans),
        "curve": curve,
        "curve_note": "extractive answers; correct = answerable and the gold answer appears in the sentence",
    }


def _answer_summary(records, gen_records, generated: bool) -> dict[str, Any]:
    answerable = [r for r in gen_records if r["answerable"]]
    out: dict[str, Any] = {"n": len(answerable)}
    systems = ["extract"] + (["rag_answer", "closed_book"] if generated else [])
    for system in systems:
        per = [answer_scores(r[system], r["answers"]) for r in answerable]
        for r, s in zip(answerable, per):
            r[f"{system}_scores"] = s
        out[system] = {m: _mean_se([s[m] for s in per]) for m in ("em", "f1", "contains")}
    if generated and answerable:
        a = [r["closed_book_scores"]["f1"] for r in answerable]
        b = [r["rag_answer_scores"]["f1"] for r in answerable]
        out["rag_minus_closed_book_f1"] = paired_bootstrap(a, b)
        gen_unans = [r for r in gen_records if not r["answerable"]]
        out["rag_abstained_answerable"] = _mean_se([float(r["rag_abstained"]) for r in answerable])
        out["rag_abstained_unanswerable"] = _mean_se([float(r["rag_abstained"]) for r in gen_unans])
    return out


def _detector(asker, gen_records, n_samples: int, stored: dict | None = None) -> dict[str, Any]:
    """SelfCheck on closed-book answers to answerable questions: does inconsistency flag the wrong ones?"""
    from lmlab.generate.config import GenerationConfig
    from lmlab.rag.consistency import ConsistencyReport, check_consistency, score_sentences

    scores, wrong = [], []
    for r in gen_records:
        if not r["answerable"]:
            continue
        if stored is not None:  # the stored answer and samples, scored again
            old = stored["records"][r["question"]].get("consistency")
            if not old or len(old["samples"]) != n_samples:
                raise LmlabError(f"the replayed run has no {n_samples}-sample detector record for {r['question']!r}",
                                 field="consistency", hint="use the earlier run's --consistency N")  # fmt: skip
            enc = asker.checker.encoder
            rep = ConsistencyReport(old["answer"], old["samples"], score_sentences(old["answer"], old["samples"], enc))
        else:
            prompt = asker.tokenizer.apply_chat_template([*CLOSED_BOOK, {"role": "user", "content": r["question"]}],
                                                         add_generation_prompt=True)  # fmt: skip
            rep = check_consistency(asker.lm, asker.tokenizer, prompt, asker.checker.encoder,
                                    GenerationConfig(max_new_tokens=64, top_p=0.95, seed=0), n_samples, 1.0)  # fmt: skip
        s = answer_scores(rep.answer, r["answers"])
        r["consistency"] = rep.to_dict()
        scores.append(rep.score)
        wrong.append(int(s["contains"] == 0 and s["f1"] < 0.5))
    pairs = list(zip(scores, wrong))
    return {"n": len(scores), "n_wrong": sum(wrong), "samples": n_samples, "auroc": auroc(scores, wrong),
            "auroc_se": bootstrap_se(pairs, lambda xs: auroc([a for a, _ in xs], [b for _, b in xs]), 200),
            "label": "closed-book answer wrong: gold answer not contained and token F1 < 0.5"}  # fmt: skip


def _stored_generations(path: str | os.PathLike) -> dict[str, Any]:
    """An earlier `rag eval --model` run's generations by question, and its model."""
    try:
        prev = json.loads(Path(path).read_text(encoding="utf-8"))
        records = {r["question"]: r for r in prev["records"] if "rag_draft" in r}
        model = prev["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmlabError(f"not an earlier `rag eval` results.json ({e})", file=str(path), field="replay") from None
    if not records or not model:
        raise LmlabError("this run generated no answers (it ran without --model)", file=str(path), field="replay")
    return {"model": model, "records": records}


class _Replay:
    """A Generator that returns what the earlier run's model wrote for the current question (set `question`):
    its draft for the prompt with sources, its closed-book answer for the one without."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        self.records, self.question = records, ""

    def __call__(self, messages: list[dict[str, str]]) -> str:
        rec = self.records.get(self.question)
        if rec is None:
            raise LmlabError(f"the replayed run did not answer {self.question!r}", field="replay",
                             hint="use the same --qa and --limit as that run")  # fmt: skip
        return rec["closed_book"] if messages[0]["content"] == CLOSED_BOOK[0]["content"] else rec["rag_draft"]


def _citation_summary(gen_records, checker: SupportChecker) -> dict[str, Any]:
    """ALCE-style proxies over generated answers: a sentence's citations recall it when they support it together;
    a citation is precise when its source alone supports its sentence."""
    recall, pairs = [], []  # pairs: (sentence, the one source it cites), scored in one batch below
    for r in gen_records:
        for s in r.get("support", []):
            if s["added"]:
                continue  # attributed by lmlab, not cited by the model
            recall.append(float(s["supported"]))
            pairs += [(s["text"], r["sources"][n - 1]) for n in s["cited"]]
    scored = checker.scores([t for t, _ in pairs], [[src] for _, src in pairs]) if pairs else []
    precision = [float(checker.supported(lex, sem)) for lex, sem in scored]
    return {"recall": _mean_se(recall), "precision": _mean_se(precision), "sentences": len(recall),
            "citations": len(pairs)}  # fmt: skip


# -- outputs ---------------------------------------------------------------------------------------------
def _fmt(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} ± {d['se']:.3f}" if not math.isnan(d.get("se", float("nan"))) else f"{d['mean']:.3f}"


def format_report(results: dict[str, Any]) -> str:
    """report.md: every headline number with its bootstrap standard error."""
    c = results["config"]
    lines = [f"# RAG evaluation: `{c['qa']}` on `{c['index']}`", "",
             f"- {results['n_questions']} questions ({results['n_answerable']} answerable); index: {c['chunks']} chunks, "
             f"encoder {c['encoder']}; model: {c['model'] or 'none (retrieval and extractive baseline only)'}",
             f"- ± is one bootstrap standard error over questions; {results['seconds']} s", *(
             [f"- generations replayed from `{c['replay']}` (greedy drafts and detector samples of that run), "
              "re-scored with this code"] if c.get("replay") else []), "",
             "## Retrieval (page-level relevance)", "", "| mode | " + " | ".join(results["retrieval"]["hybrid"]) + " |",
             "|---|" + "---:|" * len(results["retrieval"]["hybrid"])]  # fmt: skip
    for mode in MODES:
        r = results["retrieval"][mode]
        lines.append(f"| {mode} | " + " | ".join(_fmt(v) for v in r.values()) + " |")
    for other in ("bm25", "dense"):
        d = results["retrieval"].get(f"hybrid_minus_{other}_recall@5")
        if d:
            lines.append(
                f"\nhybrid − {other} recall@5: {d['diff']:+.3f} (95% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}])"
            )
    a = results["answers"]
    lines += ["", f"## Answers ({a['n']} answerable questions)", "", "| system | EM | token F1 | contains answer |",
              "|---|---:|---:|---:|"]  # fmt: skip
    names = {
        "extract": "extract best sentence (k sources)",
        "rag_answer": "LLM with retrieval",
        "closed_book": "LLM without retrieval",
    }
    for system, name in names.items():
        if system in a:
            lines.append(
                f"| {name} | {_fmt(a[system]['em'])} | {_fmt(a[system]['f1'])} | {_fmt(a[system]['contains'])} |"
            )
    if "rag_minus_closed_book_f1" in a:
        d = a["rag_minus_closed_book_f1"]
        lines.append(
            f"\nF1 with − without retrieval: {d['diff']:+.3f} (95% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}])"
        )
        lines.append(f"\nLLM abstained (support check) on {_fmt(a['rag_abstained_answerable'])} of answerable and "
                     f"{_fmt(a['rag_abstained_unanswerable'])} of unanswerable questions")  # fmt: skip
    if "citations" in results:
        ci = results["citations"]
        lines += ["", "## Citations (support proxies)", "",
                  f"- recall (sentences supported by what they cite): {_fmt(ci['recall'])} over {ci['sentences']} sentences",
                  f"- precision (citations whose source alone supports the sentence): {_fmt(ci['precision'])} over {ci['citations']} citations"]  # fmt: skip
    if "support_validation" in results:
        v = results["support_validation"]
        lines += ["", "## Support proxy against hand labels", "",
                  f"- {v['n']} labelled (sentence, source) pairs: accuracy {v['accuracy']:.3f} ± {v['accuracy_se']:.3f}, "
                  f"proxy precision {v['proxy_precision']:.3f}, recall {v['proxy_recall']:.3f}, AUROC {v['auroc']:.3f}"]  # fmt: skip
    if "detector" in results:
        d = results["detector"]
        lines += ["", "## Hallucination detector without retrieval (SelfCheck-style)", "",
                  f"- AUROC of sentence inconsistency ({d['samples']} samples) for wrong closed-book answers: "
                  f"{d['auroc']:.3f} ± {d['auroc_se']:.3f} ({d['n_wrong']} wrong of {d['n']}; {d['label']})"]  # fmt: skip
    ab = results["abstention"]
    lines += ["", "## Abstention (best question–chunk cosine)", "",
              f"- AUROC answerable vs unanswerable: {ab['auroc']:.3f} ± {ab['auroc_se']:.3f} ({ab['n_unanswerable']} unanswerable)",
              f"- threshold {ab['threshold']:.3f} (tuned on {ab['threshold_tuned_on']}): accuracy {_fmt(ab['accuracy'])}",
              f"- coverage/accuracy curve: coverage.png ({ab['curve_note']})", "",
              "![retrieval](retrieval.png)", "", "![coverage](coverage.png)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """results.json, report.md, retrieval.png (recall@k per mode) and coverage.png."""
    from lmlab.viz.figure import pyplot, save_png

    out = Path(out)
    write_json(out / "results.json", results)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    metrics = list(results["retrieval"]["hybrid"])
    for i, mode in enumerate(MODES):
        r = results["retrieval"][mode]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(metrics))], [r[m]["mean"] for m in metrics], 0.27,
               yerr=[r[m]["se"] for m in metrics], label=mode, capsize=2)  # fmt: skip
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_title("retrieval (± bootstrap SE)")
    ax.legend()
    save_png(fig, out / "retrieval.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    curve = results["abstention"]["curve"]
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve])
    ax.set_xlabel("coverage (share of questions answered, most confident first)")
    ax.set_ylabel("accuracy of answered")
    ax.set_ylim(0, 1)
    save_png(fig, out / "coverage.png")
    write_text(out / "report.md", format_report(results))
    return out


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-question records of a results.json."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["records"]
