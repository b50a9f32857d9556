"""Statistics for the benchmark report: percentiles, 95% intervals and paired tests (SciPy underneath).

Test sets are small (60 tickets in the demo), so every accuracy comes with its interval, and differences
between systems scored on the same examples get a paired test rather than two overlapping intervals.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else float("nan")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion: sound at 0/n and n/n, unlike the normal approximation."""
    if n == 0:
        return [float("nan"), float("nan")]
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(interval.low), float(interval.high)]


def mcnemar(correct_a: list[bool], correct_b: list[bool]) -> dict[str, float | int]:
    """Exact McNemar test on paired outcomes: do A and B differ on the examples where they disagree?

    Returns the counts of discordant pairs (A right, B wrong and the reverse) and the two-sided p-value
    (binomial test of those counts against 1/2; 1.0 when they never disagree)."""
    if len(correct_a) != len(correct_b):
        raise ValueError("paired outcomes must have the same length")
    a_only = sum(a and not b for a, b in zip(correct_a, correct_b, strict=True))
    b_only = sum(b and not a for a, b in zip(correct_a, correct_b, strict=True))
    p_value = 1.0
    if a_only + b_only:
        from scipy.stats import binomtest

        p_value = float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value}


def ratio_interval(
    numerator: list[bool], denominator: list[bool], seed: int, confidence: float = 0.95, resamples: int = 2000
) -> list[float]:
    """Paired percentile-bootstrap interval of accuracy(numerator) / accuracy(denominator), resampling examples."""
    import numpy as np

    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    top, bottom = a[picks].mean(axis=1), b[picks].mean(axis=1)
    ratios = np.divide(top, bottom, out=np.full_like(top, np.nan), where=bottom > 0)
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return [math.nan, math.nan]
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]
