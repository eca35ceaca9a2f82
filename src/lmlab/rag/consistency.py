"""A hallucination detector without retrieval (SelfCheckGPT-style): sample N more answers to the same prompt and
score each sentence of the main answer by how little the samples agree with it.

A model that knows a fact tends to repeat it across samples; a made-up detail changes from sample to sample.
Agreement of a sentence with one sample is the best MiniLM cosine between it and the sample's sentences
(SelfCheck's BERTScore variant, with the encoder lmlab already has) and, as a second signal, the share of its
content words that the sample uses (the unigram variant). Inconsistency = 1 - mean agreement over samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmlab.rag.ground import lexical_support, split_sentences


@dataclass
class SentenceConsistency:
    """One sentence of the main answer and how inconsistent the samples are with it (0 agreed .. 1 contradicted)."""

    text: str
    semantic: float  # 1 - mean over samples of the best cosine with a sample sentence
    lexical: float  # 1 - mean over samples of the share of its content words the sample uses
    score: float  # the mean of the two: the detector's output


@dataclass
class ConsistencyReport:
    """The main (greedy) answer, the samples, and per-sentence inconsistency; `score` is the answer's mean."""

    answer: str
    samples: list[str]
    sentences: list[SentenceConsistency] = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(np.mean([s.score for s in self.sentences])) if self.sentences else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"score": self.score}


def score_sentences(answer: str, samples: list[str], encoder) -> list[SentenceConsistency]:
    """Inconsistency of each sentence of `answer` with the `samples`."""
    sentences = split_sentences(answer)
    if not sentences:
        return []
    sample_sents = [split_sentences(s) or [""] for s in samples]
    flat = [p for ss in sample_sents for p in ss]
    vecs = encoder.encode(sentences + flat)
    main, rest = vecs[: len(sentences)], vecs[len(sentences) :]
    out, start = [], 0
    sims = np.zeros((len(sentences), len(samples)))
    for j, ss in enumerate(sample_sents):
        sims[:, j] = (main @ rest[start : start + len(ss)].T).max(axis=1)
        start += len(ss)
    for i, s in enumerate(sentences):
        semantic = 1.0 - float(np.clip(sims[i], 0, 1).mean()) if samples else 0.0
        lexical = 1.0 - float(np.mean([lexical_support(s, x) for x in samples])) if samples else 0.0
        out.append(SentenceConsistency(s, semantic, lexical, (semantic + lexical) / 2))
    return out


def check_consistency(
    model, tokenizer, prompt: str, encoder, config=None, n_samples: int = 5, temperature: float = 1.0
) -> ConsistencyReport:
    """Greedy main answer + `n_samples` sampled ones (one batch), then per-sentence inconsistency."""
    from lmlab.generate.config import GenerationConfig
    from lmlab.generate.decode import generate

    config = config or GenerationConfig()
    main = generate(model, tokenizer, prompt, config.replace(temperature=0.0, num_return_sequences=1))[0].text.strip()
    seed = 0 if config.seed is None else config.seed
    sampled = config.replace(temperature=temperature, num_return_sequences=n_samples, seed=seed, num_beams=1)
    samples = [g.text.strip() for g in generate(model, tokenizer, prompt, sampled)]
    return ConsistencyReport(main, samples, score_sentences(main, samples, encoder))


def format_consistency(report: ConsistencyReport) -> str:
    """The answer sentence by sentence with its inconsistency (higher: more likely made up)."""
    lines = [report.answer, "", f"consistency check over {len(report.samples)} samples (0 = all agree, 1 = none do):"]
    for s in report.sentences:
        lines.append(f"  {s.score:.2f} (semantic {s.semantic:.2f}, lexical {s.lexical:.2f})  {s.text}")
    lines.append(f"answer: {report.score:.2f}")
    return "\n".join(lines)
