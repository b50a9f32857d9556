"""Intervals and paired tests of the benchmark report, against values worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.benchmark.stats import mcnemar, percentile, ratio_interval, wilson_interval


def test_wilson_interval_matches_the_formula():
    # 21 of 60 (the demo's tuned student): centre (p + z^2/2n) / (1 + z^2/n), z = 1.96.
    low, high = wilson_interval(21, 60)
    assert low == pytest.approx(0.2417, abs=1e-4) and high == pytest.approx(0.4764, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


def test_mcnemar_counts_only_disagreements():
    tuned = [True] * 10 + [False] * 2 + [True] * 5
    other = [False] * 10 + [True] * 2 + [True] * 5
    test = mcnemar(tuned, other)
    assert (test["a_only"], test["b_only"]) == (10, 2)
    assert test["p_value"] == pytest.approx(0.03857, abs=1e-4)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_ratio_interval_brackets_the_ratio():
    tuned = [True] * 30 + [False] * 30
    teacher = [True] * 50 + [False] * 10
    low, high = ratio_interval(tuned, teacher, seed=0)
    assert low < 0.5 / (50 / 60) < high and high - low < 0.5


def test_percentile_is_linear():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
