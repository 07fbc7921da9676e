"""The confidence interval every report of a mean uses (star-analyze's gradient cosines,
star-judge's criterion scores): the two-sided Student t-interval

    mean +- t_{(1+c)/2, n-1} * s / sqrt(n),   s = sqrt(sum (v - mean)^2 / (n - 1))

which treats the values as independent draws; with n = 50 the 95% quantile is 2.01, and it
tends to the normal's 1.96 as n grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """Mean of values with a two-sided t confidence interval (None below 2 values)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard deviation (n - 1 denominator);
    one value gives no interval (no spread to estimate), none is a ValueError."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * s / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)
