"""Evaluation: perplexity, multiple choice by log-likelihood, generation tasks, metrics with error bars, reports."""

from lmlab.eval.bootstrap import bootstrap_se, paired_bootstrap
from lmlab.eval.calibration import confusion_matrix, expected_calibration_error
from lmlab.eval.harness import evaluate, generation_prompts, run_generation, run_multiple_choice, run_ppl
from lmlab.eval.metrics import (
    accuracy,
    bleu,
    bleu_from_stats,
    bleu_stats,
    chrf,
    chrf_from_stats,
    chrf_stats,
    exact_match,
    precision_recall_f1,
    rouge,
    token_f1,
)
from lmlab.eval.multiple_choice import loglikelihoods
from lmlab.eval.perplexity import perplexity, window_nlls
from lmlab.eval.report import compare, format_comparison, format_markdown, load_results, write_results
from lmlab.eval.scoring import compare_generations, example_scores, score_classification, score_generations
from lmlab.eval.tasks import GENERATION_METRICS, GenerationTask, Task, load_task

__all__ = [
    "GENERATION_METRICS",
    "GenerationTask",
    "Task",
    "accuracy",
    "bleu",
    "bleu_from_stats",
    "bleu_stats",
    "bootstrap_se",
    "chrf",
    "chrf_from_stats",
    "chrf_stats",
    "compare",
    "compare_generations",
    "confusion_matrix",
    "evaluate",
    "exact_match",
    "example_scores",
    "expected_calibration_error",
    "format_comparison",
    "format_markdown",
    "generation_prompts",
    "load_results",
    "load_task",
    "loglikelihoods",
    "paired_bootstrap",
    "perplexity",
    "precision_recall_f1",
    "rouge",
    "run_generation",
    "run_multiple_choice",
    "run_ppl",
    "score_classification",
    "score_generations",
    "token_f1",
    "window_nlls",
    "write_results",
]
