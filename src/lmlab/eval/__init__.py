"""Evaluation: perplexity, multiple choice by log-likelihood, metrics with bootstrap error bars, reports."""

from lmlab.eval.bootstrap import bootstrap_se, paired_bootstrap
from lmlab.eval.calibration import confusion_matrix, expected_calibration_error
from lmlab.eval.harness import evaluate, run_multiple_choice, run_ppl
from lmlab.eval.metrics import accuracy, bleu, chrf, exact_match, precision_recall_f1, rouge, token_f1
from lmlab.eval.multiple_choice import loglikelihoods
from lmlab.eval.perplexity import perplexity, window_nlls
from lmlab.eval.report import compare, format_comparison, format_markdown, load_results, write_results
from lmlab.eval.scoring import score_classification, score_generations
from lmlab.eval.tasks import Task, load_task

__all__ = [
    "Task",
    "accuracy",
    "bleu",
    "bootstrap_se",
    "chrf",
    "compare",
    "confusion_matrix",
    "evaluate",
    "exact_match",
    "expected_calibration_error",
    "format_comparison",
    "format_markdown",
    "load_results",
    "load_task",
    "loglikelihoods",
    "paired_bootstrap",
    "perplexity",
    "precision_recall_f1",
    "rouge",
    "run_multiple_choice",
    "run_ppl",
    "score_classification",
    "score_generations",
    "token_f1",
    "window_nlls",
    "write_results",
]
