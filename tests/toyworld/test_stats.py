"""The benchmark statistics on samples whose answers are known."""

import math

import numpy as np
import pytest

from toyworld.stats import Estimate, bootstrap_mean, paired_comparison, sign_test


def test_sign_test_known_values():
    assert sign_test(8, 0) == 2 / 256
    assert sign_test(0, 8) == 2 / 256
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)  # P(X <= 1) = (1 + 8) / 256, two-sided
    assert sign_test(3, 3) == 1.0
    assert sign_test(0, 0) == 1.0
    assert sign_test(1, 0) == 1.0


def test_sign_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(9, 3), (2, 10), (5, 6), (12, 0), (15, 4)]:
        assert sign_test(wins, losses) == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def test_bootstrap_of_a_constant_sample_is_that_constant():
    assert bootstrap_mean([0.25] * 6) == Estimate(0.25, 0.25, 0.25, 6)
    assert bootstrap_mean([0.7]) == Estimate(0.7, 0.7, 0.7, 1)
    assert str(bootstrap_mean([0.7])) == "0.700 (n=1)"


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.55, 0.9]
    estimate = bootstrap_mean(values, seed=3)
    assert estimate.mean == pytest.approx(np.mean(values))
    assert estimate.low < estimate.mean < estimate.high
    assert min(values) <= estimate.low and estimate.high <= max(values)
    assert bootstrap_mean(values, seed=3) == estimate
    assert bootstrap_mean(values, seed=4) != estimate  # another generator, (slightly) other quantiles
    # the percentile interval of the mean is about mean +- 1.96 standard errors for a sample this size
    half_width = 1.96 * np.std(values) / math.sqrt(len(values))
    assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.15)
    assert str(estimate) == f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"


def test_a_wider_confidence_gives_a_wider_interval():
    values = [0.0, 1.0, 0.5, 0.25, 0.75, 0.6]
    narrow, wide = bootstrap_mean(values, confidence=0.5), bootstrap_mean(values, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([], {}, "non-empty"),
        ([0.1, float("nan")], {}, "finite"),
        ([0.1, 0.2], {"confidence": 1.0}, "confidence"),
        ([0.1, 0.2], {"resamples": 0}, "resamples"),
    ],
)
def test_bootstrap_refuses_what_it_cannot_estimate(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mean(values, **kwargs)


def test_paired_comparison_over_subject_seed_pairs():
    pairs = [(subject, seed) for subject in ("star", "square") for seed in range(4)]
    lora = {key: 0.1 * i for i, key in enumerate(pairs)}
    lily = {key: value + 0.2 for key, value in lora.items()}  # better by exactly 0.2 in every pair
    comparison = paired_comparison(lily, lora)
    assert (comparison.wins, comparison.losses, comparison.ties, comparison.n) == (8, 0, 0, 8)
    assert comparison.p_value == 2 / 256
    assert comparison.difference.mean == pytest.approx(0.2)
    assert comparison.difference.low == pytest.approx(0.2) and comparison.difference.high == pytest.approx(0.2)


def test_paired_comparison_counts_ties_and_pairs_by_key_not_order():
    a = {("star", 0): 0.5, ("star", 1): 0.2, ("star", 2): 0.9}
    b = {("star", 2): 0.1, ("star", 0): 0.5, ("star", 1): 0.4}
    comparison = paired_comparison(a, b)
    assert (comparison.wins, comparison.losses, comparison.ties) == (1, 1, 1)
    assert comparison.p_value == 1.0
    assert comparison.difference.mean == pytest.approx((0.0 - 0.2 + 0.8) / 3)
    assert comparison.difference.low < comparison.difference.mean < comparison.difference.high


def test_paired_comparison_refuses_unmatched_pairs():
    with pytest.raises(ValueError, match=r"unmatched: \('star', 1\)"):
        paired_comparison({("star", 0): 0.1, ("star", 1): 0.2}, {("star", 0): 0.3})
