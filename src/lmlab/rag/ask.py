"""`lmlab rag ask`: one call from an index file and a question to a grounded answer."""

from __future__ import annotations

import os

from lmlab.rag.ground import DEFAULT_THRESHOLD, GroundedAnswer, SupportChecker, answer_question, chat_generator
from lmlab.rag.index import Index
from lmlab.rag.retrieve import IndexRetriever, check_mode

EXTRACT = "extract"  # --model extract: no language model, the best-matching source sentence, cited


class Asker:
    """An index, its encoder and a chat model, loaded once for many questions (the CLI, the server, evaluation)."""

    def __init__(self, index_path: str | os.PathLike, model: str | None = "smollm2-135m-instruct", config=None) -> None:
        self.index = Index(index_path)
        self.index.require_chunks()
        self.index.warm()  # many questions: BM25 postings and vectors in memory
        self.retriever = IndexRetriever(self.index)
        self.checker = SupportChecker(self.retriever.encoder)
        self.generator, self.lm, self.tokenizer = None, None, None
        if model and model != EXTRACT:
            from lmlab.errors import LmlabError
            from lmlab.model.checkpoint import load_pretrained
            from lmlab.utils.device import default_device

            lm, tokenizer = load_pretrained(model, device=default_device())  # the one device rule
            if tokenizer is None or tokenizer.chat_template is None:
                raise LmlabError("this checkpoint has no chat template", file=str(model), hint="use an instruct model")
            self.generator = chat_generator(lm, tokenizer, config)
            self.lm, self.tokenizer = lm, tokenizer

    @property
    def threshold(self) -> float:
        """The abstention threshold tuned on a dev split (`rag eval --dev ... --save-threshold`), else the default."""
        return float(self.index.meta.get("abstain_threshold", DEFAULT_THRESHOLD))

    def ask(self, question: str, k: int = 5, mode: str = "hybrid", threshold: float | None = None) -> GroundedAnswer:
        """A grounded answer (or an abstention) to one question."""
        check_mode(mode, k)
        t = self.threshold if threshold is None else threshold
        return answer_question(question, self.retriever, self.generator, self.checker, k, mode, t)


def ask(
    index_path: str | os.PathLike,
    question: str,
    model: str | None = "smollm2-135m-instruct",
    mode: str = "hybrid",
    k: int = 5,
    threshold: float | None = None,
) -> GroundedAnswer:
    """Answer one question from an index: retrieve, generate with citations, check, or abstain."""
    check_mode(mode, k)
    return Asker(index_path, model).ask(question, k, mode, threshold)
