"""Grounding: numbered sources, citation clean-up, the support check and the three ways to abstain."""

from __future__ import annotations

import pytest

from lmlab.rag.ground import (
    ABSTAIN,
    SupportChecker,
    answer_question,
    build_messages,
    citations_of,
    clean_citations,
    lexical_support,
    split_sentences,
)
from lmlab.rag.index import Index
from lmlab.rag.retrieve import IndexRetriever

Q = "At what temperature is green tea brewed?"


@pytest.fixture(scope="module")
def setup(small_index, encoder):
    index = Index(small_index)
    yield IndexRetriever(index, encoder), SupportChecker(encoder)
    index.close()


def test_citations_and_sentences():
    text, dropped = clean_citations("Tea is hot [1]. Bikes [2, 7] roll [0]. Done [3]", 3)
    assert (text, dropped) == ("Tea is hot [1]. Bikes [2] roll. Done [3]", 2)
    assert citations_of(text) == [1, 2, 3]
    assert split_sentences("One thing. [2] Two things!\nThree") == ["One thing. [2]", "Two things!", "Three"]
    assert lexical_support("Green tea is brewed at 80 degrees [1].", "green tea: 80 degrees, brewed") == 1.0
    assert lexical_support("Mauna Loa erupts", "green tea") == 0.0


def test_a_sentence_without_content_words_is_never_supported(setup):
    _, checker = setup
    (lex, sem), (lex2, _) = checker.scores(["* [1]", "Green tea [1]."], [["* Green tea."], ["* Green tea."]])
    assert (lex, sem) == (0.0, 0.0) and lex2 == 1.0


def test_prompt_numbers_the_sources(setup):
    retriever, _ = setup
    hits = retriever.search(Q, 3)
    messages = build_messages(Q, hits)
    user = messages[-1]["content"]
    assert "[1] Tea" in user and "[3] " in user and "[4] " not in user and user.rstrip().endswith("like [1].")


def test_supported_answer_keeps_valid_citations(setup):
    retriever, checker = setup
    gen = lambda messages: "Green tea is brewed at 80 degrees Celsius for two minutes [1][9]."
    a = answer_question(Q, retriever, gen, checker, k=3)
    assert not a.abstained and a.removed_citations == 1 and a.citations == [1]
    assert a.answer == "Green tea is brewed at 80 degrees Celsius for two minutes [1]."
    assert a.sources[0]["doc_id"] == "tea.md" and set(a.sources[0]) == {"n", "doc_id", "chunk_id", "score", "text"}
    assert a.support[0].supported and a.support[0].lexical == 1.0 and a.support[0].semantic > 0.6
    assert a.retrieval[0]["why"]  # why each source came back


def test_uncited_sentence_is_attributed(setup):
    retriever, checker = setup
    a = answer_question(Q, retriever, lambda m: "Green tea is brewed at 80 degrees Celsius.", checker, k=3)
    assert not a.abstained and a.added_citations == 1 and a.citations == [1] and a.answer.endswith("Celsius. [1]")


def test_three_ways_to_abstain(setup):
    retriever, checker = setup
    made_up = answer_question(Q, retriever, lambda m: "The moon is made of cheese [1]. Cats rule it [2].", checker)
    assert made_up.abstained and made_up.abstain_reason == "unsupported" and made_up.answer == ABSTAIN
    assert made_up.citations == [] and made_up.draft.startswith("The moon")
    calls = []
    far = answer_question("Who won the 1998 football world cup?", retriever, lambda m: calls.append(m) or "France.",
                          checker, threshold=0.3)  # fmt: skip
    assert far.abstained and far.abstain_reason == "retrieval" and far.confidence < 0.3 and not calls
    unsure = answer_question(Q, retriever, lambda m: "I don't know.", checker)
    assert unsure.abstained and unsure.abstain_reason == "model"


def test_extractive_answer(setup):
    retriever, checker = setup
    a = answer_question("How long does a worker bee live?", retriever, None, checker, k=3)
    assert not a.abstained and "six weeks" in a.answer and a.sources[a.citations[0] - 1]["doc_id"] == "bees.md"
