"""Confusion matrix equals scikit-learn's; ECE on hand-checked bins; the plots are PNG files."""

from __future__ import annotations

import random

import pytest

from lmlab.eval.calibration import (
    calibration_bins,
    choice_probabilities,
    confusion_matrix,
    expected_calibration_error,
    plot_confusion,
    plot_reliability,
)


def test_confusion_matrix_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    y_true = [rng.choice("abc") for _ in range(100)]
    y_pred = [t if rng.random() < 0.5 else rng.choice("abcd") for t in y_true]
    ours, labels = confusion_matrix(y_true, y_pred)
    assert labels == ["a", "b", "c", "d"]
    assert ours == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_expected_calibration_error_by_hand():
    conf = [0.95, 0.95, 0.65, 0.65, 0.25]
    correct = [1, 0, 1, 1, 0]
    # bins: (0.9,1]: conf .95 acc .5 (n 2); (0.6,0.7]: .65 vs 1 (n 2); (0.2,0.3]: .25 vs 0 (n 1)
    expected = 2 / 5 * 0.45 + 2 / 5 * 0.35 + 1 / 5 * 0.25
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert sum(choice_probabilities([-1.0, -2.0, -3.0])) == pytest.approx(1.0)


def test_plots_are_png(tmp_path):
    m, labels = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2])
    for p in (
        plot_confusion(m, labels, tmp_path / "cm.png"),
        plot_reliability(calibration_bins([0.9, 0.4, 0.7], [1, 0, 1]), tmp_path / "rel.png"),
    ):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
