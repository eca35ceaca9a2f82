"""Bootstrap error bars: the SE of a mean matches the binomial formula; paired differences and reports."""

from __future__ import annotations

import math

import pytest

from lmlab.eval.bootstrap import bootstrap_se, paired_bootstrap
from lmlab.eval.report import compare, format_comparison, format_markdown, load_results, write_results


def test_bootstrap_se_of_accuracy_matches_binomial():
    xs = [1.0] * 300 + [0.0] * 700
    assert bootstrap_se(xs, n_boot=2000) == pytest.approx(math.sqrt(0.3 * 0.7 / 1000), rel=0.1)
    ratio = lambda ws: sum(a for a, _ in ws) / sum(b for _, b in ws)
    assert bootstrap_se([(2.0, 1), (4.0, 1), (3.0, 1), (5.0, 1)] * 10, ratio, n_boot=500) > 0


def test_paired_bootstrap_sees_a_real_difference():
    a = [1.0 if i % 2 else 0.0 for i in range(400)]
    b = [1.0 if i % 2 or i % 4 == 0 else 0.0 for i in range(400)]  # b right on 100 more
    r = paired_bootstrap(a, b, n_boot=500)
    assert r["diff"] == pytest.approx(0.25)
    assert 0 < r["ci_low"] < 0.25 < r["ci_high"]
    same = paired_bootstrap(a, a, n_boot=100)
    assert same["ci_low"] == same["ci_high"] == 0.0


def test_results_report_and_compare_round_trip(tmp_path):
    def results(accs):
        recs = [{"acc": x, "acc_norm": x} for x in accs]
        return {
            "config": {"model": "m", "tasks": ["mmlu"], "limit": None, "num_fewshot": 0},
            "model_hash": "ab" * 32,
            "tasks": {"mmlu": {"acc": sum(accs) / len(accs), "acc_se": 0.01, "acc_norm": 0.5, "records": recs}},
        }

    write_results(results([0.0, 1.0] * 50), tmp_path / "a")
    write_results(results([1.0, 1.0] * 50), tmp_path / "b")
    assert "| mmlu | acc | 0.5000 | 0.0100 |" in (tmp_path / "a" / "report.md").read_text()
    assert format_markdown(load_results(tmp_path / "a")).startswith("# Evaluation of `m`")
    rows = compare(load_results(tmp_path / "a"), load_results(tmp_path / "b" / "results.json"), n_boot=200)
    acc = next(r for r in rows if r["metric"] == "acc")
    assert acc["diff"] == pytest.approx(0.5) and acc["ci_low"] > 0
    assert "| mmlu | acc | 0.5000 | 1.0000 | +0.5000 |" in format_comparison(rows)
