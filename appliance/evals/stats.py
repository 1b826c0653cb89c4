"""The statistics an eval report needs, exact where that is cheap."""

from __future__ import annotations

import math
import random

from appliance.telemetry.queries import percentile

__all__ = [
    "mcnemar_exact",
    "paired_bootstrap_interval",
    "percentile",
    "percentile_interval",
    "wilson_interval",
]

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_interval(
    candidate: list[bool], baseline: list[bool], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of pass-rate(candidate) - pass-rate(baseline), resampling
    cases (pairs) with replacement; deterministic for a given seed."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("the bootstrap needs two equally long, non-empty paired lists")
    rng = random.Random(seed)
    differences = [int(a) - int(b) for a, b in zip(candidate, baseline, strict=True)]
    n = len(differences)
    means = sorted(
        sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)
    )
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def percentile_interval(
    values: list[float], q: float, resamples: int = 2000, seed: int = 0
) -> tuple[float | None, float | None]:
    """95% bootstrap percentile interval of the q-th percentile of `values` (resampling the
    requests with replacement; deterministic for a given seed)."""
    if not values:
        return None, None
    rng = random.Random(seed)
    n = len(values)
    estimates = sorted(
        percentile([values[rng.randrange(n)] for _ in range(n)], q) for _ in range(resamples)
    )
    return estimates[int(0.025 * resamples)], estimates[int(0.975 * resamples) - 1]
