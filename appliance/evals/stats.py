"""The statistics an eval report needs, exact where that is cheap."""

from __future__ import annotations

import math
import random

import numpy as np

from appliance.telemetry.queries import percentile

__all__ = [
    "mcnemar_exact",
    "rate_regression_p",
    "paired_bootstrap_interval",
    "percentile",
    "percentile_interval",
    "percentile_excess_interval",
    "wilson_interval",
]

Z_95 = 1.959963984540054
_BOOTSTRAP_BATCH_VALUES = 1 << 20  # values drawn at once by a bootstrap: 8 MiB of floats


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
    estimates = np.sort(_bootstrap_percentiles(values, q, resamples, np.random.default_rng(seed)))
    return _interval_95(estimates)


def percentile_excess_interval(
    candidate: list[float],
    baseline: list[float],
    q: float,
    factor: float,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% bootstrap interval of percentile_q(candidate) - factor x percentile_q(baseline),
    resampling each side's values with replacement, independently (deterministic for a
    given seed). Both sides' percentiles are estimates, so a comparison against the
    baseline's single figure would take its noise for a regression."""
    if not candidate or not baseline:
        raise ValueError("the bootstrap needs two non-empty lists")
    rng = np.random.default_rng(seed)
    excess = _bootstrap_percentiles(candidate, q, resamples, rng) - factor * (
        _bootstrap_percentiles(baseline, q, resamples, rng)
    )
    return _interval_95(np.sort(excess))


def _bootstrap_percentiles(
    values: list[float], q: float, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The nearest-rank q-th percentile (as `percentile`) of `resamples` resamples of
    `values`, drawn in batches so that a long window stays in bounded memory."""
    data = np.asarray(values, dtype=float)
    n, rank = len(data), max(1, math.ceil(q / 100 * len(data)))
    per_batch = max(1, _BOOTSTRAP_BATCH_VALUES // n)
    batches = []
    for start in range(0, resamples, per_batch):
        drawn = data[rng.integers(0, n, size=(min(per_batch, resamples - start), n))]
        ranked = np.partition(drawn, rank - 1, axis=1)
        batches.append(ranked[:, rank - 1].copy())  # a view would keep all of `ranked`
    return np.concatenate(batches)


def _interval_95(ordered: np.ndarray) -> tuple[float, float]:
    return float(ordered[int(0.025 * len(ordered))]), float(ordered[int(0.975 * len(ordered)) - 1])


def rate_regression_p(
    bad_candidate: int, n_candidate: int, bad_stable: int, n_stable: int, margin: float
) -> float:
    """One-sided p-value that the candidate's rate of bad outcomes exceeds stable's by more
    than `margin` (a two-proportion z-test against H0: p_candidate - p_stable <= margin,
    unpooled variance). Small means a significant regression beyond the margin."""
    if n_candidate == 0 or n_stable == 0:
        return 1.0
    p_c, p_s = bad_candidate / n_candidate, bad_stable / n_stable
    excess = p_c - p_s - margin
    variance = p_c * (1 - p_c) / n_candidate + p_s * (1 - p_s) / n_stable
    if variance == 0:
        return 0.0 if excess > 0 else 1.0
    return 0.5 * math.erfc(excess / math.sqrt(variance) / math.sqrt(2))
