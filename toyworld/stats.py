"""Statistics for the benchmarks: a mean with its bootstrap interval, and a paired comparison of two methods.

Pure functions on plain numbers (numpy only). Intervals are percentile bootstraps with a seeded generator, so a
table regenerates identically; the paired comparison adds an exact two-sided sign test over the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    """A sample's mean and its bootstrap interval (`low` = `high` = the value for a single observation)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        """'0.512 [0.401, 0.623]'; a single observation shows its value and 'n=1' instead of an interval."""
        if self.n == 1:
            return f"{self.mean:.3f} (n=1)"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedComparison:
    """Method a minus method b over matched pairs: the mean difference, its interval and a sign test."""

    difference: Estimate
    wins: int  # pairs where a scored higher
    losses: int  # pairs where b scored higher
    ties: int
    p_value: float  # exact two-sided sign test, ties dropped

    @property
    def n(self) -> int:
        return self.difference.n


def _checked(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("a bootstrap needs a non-empty list of numbers")
    if not np.all(np.isfinite(array)):
        raise ValueError("a bootstrap needs finite numbers (got NaN or infinity)")
    return array


def bootstrap_mean(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """The mean of `values` with a percentile bootstrap interval at `confidence` (seeded: same input, same answer)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    sample = _checked(values)
    mean = float(sample.mean())
    if sample.size == 1 or np.all(sample == sample[0]):
        return Estimate(mean, mean, mean, int(sample.size))
    rng = np.random.default_rng(seed)
    means = sample[rng.integers(0, sample.size, size=(resamples, sample.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(mean, float(low), float(high), int(sample.size))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven | each pair is a fair coin); 1.0 with no pairs."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be non-negative, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    a: Mapping[Hashable, float],
    b: Mapping[Hashable, float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Compare a with b over the same keys (e.g. (subject, seed) pairs): paired bootstrap of a - b and a sign test.

    Both mappings must hold the same keys; a key in one only is a `ValueError` naming it (a pair without its
    partner would silently bias the comparison).
    """
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        missing = sorted(map(str, only_a | only_b))
        raise ValueError(f"paired comparison needs the same pairs on both sides; unmatched: {', '.join(missing)}")
    keys = sorted(a, key=str)
    differences = [a[key] - b[key] for key in keys]
    estimate = bootstrap_mean(differences, confidence, resamples, seed)
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    return PairedComparison(estimate, wins, losses, len(differences) - wins - losses, sign_test(wins, losses))
