"""Grounded answers: numbered sources in the prompt, `[n]` citations checked against them, and abstention.

The flow (ARCHITECTURE.md, flow 5): retrieve -> abstain early if even the best chunk is far from the question ->
prompt with numbered sources -> generate -> drop citations that point at no source -> check each sentence
against the text it cites (word overlap and MiniLM similarity; no NLI model installs offline) -> the answer,
or an abstention when too little of it is supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmlab.rag.index import STOPWORDS, fts_tokens
from lmlab.rag.retrieve import Hit, Retriever

ABSTAIN = "I don't know: the sources do not answer this."
SYSTEM = (
    "You answer questions using only the numbered sources you are given. After each sentence, cite the sources "
    "it uses with their numbers in brackets, like [1]. If the sources do not contain the answer, reply exactly: "
    "I don't know."
)
DEFAULT_THRESHOLD = 0.30  # question-chunk cosine below which nothing relevant was found; tune with `rag eval --dev`
SUPPORT_THRESHOLD = 0.6  # a sentence is supported when its overlap or similarity with the cited text reaches this
MIN_SUPPORTED = 0.5  # share of an answer's sentences that must be supported, else abstain
_CITATION = re.compile(r"\s*\[(\d+(?:\s*,\s*\d+)*)\]")
_LEADING_CITATIONS = re.compile(r"((?:\s*\[\d+(?:\s*,\s*\d+)*\])+)\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_DONT_KNOW = re.compile(
    r"\b(i don'?t know|i do not know|cannot answer|can't answer|not (?:mentioned|contained))\b", re.I
)

Generator = Callable[[list[dict[str, str]]], str]


@dataclass
class SentenceSupport:
    """How well one answer sentence is backed by the sources it cites."""

    text: str
    cited: list[int]
    lexical: float  # share of the sentence's content words found in the cited text
    semantic: float  # best cosine between the sentence and a sentence of the cited text
    supported: bool
    added: bool = False  # its citation was attributed after generation (the model cited nothing valid)


@dataclass
class GroundedAnswer:
    """An answer with its sources and citations (the `rag ask --json` object), and how it was judged."""

    question: str
    answer: str
    abstained: bool
    sources: list[dict[str, Any]]
    citations: list[int]
    abstain_reason: str | None = None  # "retrieval", "model" or "unsupported"
    confidence: float = 0.0  # best question-chunk cosine
    draft: str = ""  # the generated text before citation clean-up and abstention
    removed_citations: int = 0  # citations that pointed at no source
    added_citations: int = 0
    support: list[SentenceSupport] = field(default_factory=list)
    retrieval: list[dict[str, Any]] = field(default_factory=list)  # each hit's ranks and scores: why it came back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_sentences(text: str) -> list[str]:
    """Sentences of an answer; a bare citation after the full stop ("... end. [2]") stays with its sentence."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        piece = piece.strip()
        lead = _LEADING_CITATIONS.match(piece)
        if out and lead:  # "[2]" opening a piece belongs to the sentence before it
            out[-1] += " " + lead.group(1).strip()
            piece = piece[lead.end() :].strip()
        if piece:
            out.append(piece)
    return out


def build_messages(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
    """The chat: instructions, then the sources numbered from 1, then the question."""
    sources = "\n\n".join(
        f"[{n}] {h.heading}\n{h.text}" if h.heading else f"[{n}] {h.text}" for n, h in enumerate(hits, 1)
    )
    user = f"Sources:\n\n{sources}\n\nQuestion: {question}\nAnswer briefly and cite the sources like [1]."
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean_citations(text: str, n_sources: int) -> tuple[str, int]:
    """Drop `[n]` markers with no source n (keeping valid numbers of a group); returns (text, how many dropped)."""
    dropped = 0

    def fix(m: re.Match) -> str:
        nonlocal dropped
        nums = [int(x) for x in re.findall(r"\d+", m.group(1))]
        good = [n for n in nums if 1 <= n <= n_sources]
        dropped += len(nums) - len(good)
        return f" [{', '.join(map(str, good))}]" if good else ""

    return _CITATION.sub(fix, text).strip(), dropped


def citations_of(text: str) -> list[int]:
    """The distinct source numbers a text cites, in order of first appearance."""
    return list(dict.fromkeys(int(x) for m in _CITATION.finditer(text) for x in re.findall(r"\d+", m.group(1))))


def content_words(text: str) -> set[str]:
    """Lowercase words that carry meaning (stopwords dropped), for overlap."""
    return {t for t in fts_tokens(text) if t not in STOPWORDS}


def lexical_support(sentence: str, source: str) -> float:
    """Share of the sentence's content words that appear in the source (0 for a sentence with none: "::" or
    "[1]" alone claims nothing a source could support)."""
    words = content_words(_CITATION.sub("", sentence))
    return len(words & content_words(source)) / len(words) if words else 0.0


class SupportChecker:
    """Judge answer sentences against source texts: word overlap, and MiniLM cosine to the closest source sentence."""

    def __init__(self, encoder, threshold: float = SUPPORT_THRESHOLD) -> None:
        self.encoder, self.threshold = encoder, threshold

    def scores(self, sentences: Sequence[str], sources: Sequence[Sequence[str]]) -> list[tuple[float, float]]:
        """(lexical, semantic) of sentence i against the texts sources[i] (empty: 0, 0)."""
        texts = [_CITATION.sub("", s).strip() or s for s in sentences]
        pieces = sorted({p for srcs in sources for src in srcs for p in split_sentences(src)})
        vecs = self.encoder.encode(texts + pieces) if texts else np.zeros((0, 1))
        sent_vecs, piece_vecs = vecs[: len(texts)], vecs[len(texts) :]
        where = {p: i for i, p in enumerate(pieces)}
        out = []
        for i, srcs in enumerate(sources):
            if not srcs:
                out.append((0.0, 0.0))
                continue
            if not content_words(texts[i]):  # "*", "::", "```": no claim, so nothing to support (MiniLM still
                out.append((0.0, 0.0))  # found such marks 0.6-0.7 "similar" to source text with the same marks)
                continue
            lex = max(lexical_support(texts[i], s) for s in srcs)
            idx = [where[p] for s in srcs for p in split_sentences(s)]
            sem = float((piece_vecs[idx] @ sent_vecs[i]).max()) if idx else 0.0
            out.append((lex, sem))
        return out

    def supported(self, lexical: float, semantic: float) -> bool:
        """The decision rule: either signal reaching the threshold."""
        return max(lexical, semantic) >= self.threshold


def check_answer(
    text: str, sources: Sequence[str], checker: SupportChecker, attribute: bool = True
) -> tuple[list[SentenceSupport], int]:
    """Each sentence judged against the sources it cites; an uncited sentence, when `attribute`, gets the one
    source that supports it best (if any does). Returns (per-sentence support, citations added)."""
    sentences = split_sentences(text)
    cited = [[n for n in citations_of(s) if 1 <= n <= len(sources)] for s in sentences]
    # uncited sentences are scored against each source alone, to pick the best one
    queries, owners = [], []
    for i in range(len(sentences)):
        if cited[i]:
            queries.append([sources[n - 1] for n in cited[i]])
            owners.append((i, None))
        elif attribute:
            for n in range(1, len(sources) + 1):
                queries.append([sources[n - 1]])
                owners.append((i, n))
    scored = checker.scores([sentences[i] for i, _ in owners], queries)
    best: dict[int, tuple[float, float, int | None]] = {}
    for (i, n), (lex, sem) in zip(owners, scored):
        if i not in best or max(lex, sem) > max(best[i][:2]):
            best[i] = (lex, sem, n)
    out, added = [], 0
    for i, s in enumerate(sentences):
        lex, sem, n = best.get(i, (0.0, 0.0, None))
        ok = checker.supported(lex, sem)
        if n is not None and ok:
            out.append(SentenceSupport(s, [n], lex, sem, True, added=True))
            added += 1
        else:
            out.append(SentenceSupport(s, cited[i], lex, sem, ok and bool(cited[i])))
    return out, added


def best_sentence(question: str, hits: Sequence[Hit], encoder) -> tuple[str, int]:
    """The extractive baseline: the source sentence closest to the question (MiniLM cosine), and its source number."""
    pieces = [(p, n) for n, h in enumerate(hits, 1) for p in split_sentences(h.text) if len(p.split()) >= 3]
    if not pieces:
        return "", 0
    vecs = encoder.encode([question] + [p for p, _ in pieces])
    i = int(np.argmax(vecs[1:] @ vecs[0]))
    return pieces[i][0], pieces[i][1]


def chat_generator(model, tokenizer, config=None) -> Generator:
    """A Generator over lmlab's decoder: the chat template, then greedy decoding (64 new tokens) by default."""
    from lmlab.generate.config import GenerationConfig
    from lmlab.generate.decode import generate

    config = config or GenerationConfig(max_new_tokens=64)

    def run(messages: list[dict[str, str]]) -> str:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return generate(model, tokenizer, prompt, config)[0].text.strip()

    return run


def answer_question(
    question: str,
    retriever: Retriever,
    generator: Generator | None,
    checker: SupportChecker,
    k: int = 5,
    mode: str = "hybrid",
    threshold: float = DEFAULT_THRESHOLD,
    min_supported: float = MIN_SUPPORTED,
) -> GroundedAnswer:
    """Retrieve, generate with numbered sources (or, with generator None, extract the best sentence), check, decide."""
    hits = retriever.search(question, k, mode)
    relevance = retriever.relevance(question, hits)
    sources = [
        {"n": n, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score, "text": h.text}
        for n, h in enumerate(hits, 1)
    ]
    why = [{"chunk_id": h.chunk_id, "rank": h.rank, "score": h.score, "relevance": r, "why": h.why}
           for h, r in zip(hits, relevance)]  # fmt: skip
    result = GroundedAnswer(question, "", False, sources, [], confidence=max(relevance, default=0.0), retrieval=why)
    if result.confidence < threshold:
        result.answer, result.abstained, result.abstain_reason = ABSTAIN, True, "retrieval"
        return result
    if generator is None:
        sentence, n = best_sentence(question, hits, checker.encoder)
        draft = f"{sentence} [{n}]" if sentence else ""
    else:
        draft = generator(build_messages(question, hits))
    result.draft = draft
    text, result.removed_citations = clean_citations(draft, len(hits))
    if not text or _DONT_KNOW.search(text):
        result.answer, result.abstained, result.abstain_reason = ABSTAIN, True, "model"
        return result
    result.support, result.added_citations = check_answer(text, [h.text for h in hits], checker)
    for s in result.support:  # write attributed citations into the text, so the answer shows them
        if s.added:
            text = text.replace(s.text, f"{s.text} [{s.cited[0]}]", 1)
    result.citations = citations_of(text)
    share = sum(s.supported for s in result.support) / max(1, len(result.support))
    if share < min_supported:
        result.answer, result.abstained, result.abstain_reason = ABSTAIN, True, "unsupported"
        result.citations = []
        return result
    result.answer = text
    return result


def format_answer(result: GroundedAnswer, verbose: bool = False) -> str:
    """The answer, then its numbered sources (cited ones marked), and with `verbose` why each was retrieved."""
    lines = [result.answer, ""]
    if result.abstained:
        lines[0] += f"  (abstained: {result.abstain_reason}; best source cosine {result.confidence:.3f})"
    if result.removed_citations:
        lines.append(f"({result.removed_citations} citation(s) to no source removed)")
    for s in result.sources:
        mark = "*" if s["n"] in result.citations else " "
        lines.append(f"{mark}[{s['n']}] {s['chunk_id']} (score {s['score']:.4f}): {' '.join(s['text'].split())[:160]}")
    if verbose:
        from lmlab.rag.retrieve import report

        hits = [Hit(r["chunk_id"], "", "", "", r["score"], r["rank"], r["why"]) for r in result.retrieval]
        lines += ["", report(result.question, "", hits)]
        if result.draft:
            lines += ["draft: " + result.draft]
    return "\n".join(lines)
