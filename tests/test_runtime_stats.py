"""Statistics against numpy and exact binomial sums; coverage of the median CI by simulation (seeded)."""
import math

import numpy as np
import pytest

from edgec.runtime.stats import min_samples, paired_ratio, quantile_ci, quantile_ci_ranks, summarize


def test_percentiles_match_numpy():
    x = np.random.default_rng(3).lognormal(0, 0.3, 537)
    s = summarize(x)
    for q in (50, 90, 95, 99):
        assert getattr(s, f"p{q}") == pytest.approx(np.percentile(x, q))
    assert (s.min, s.max, s.mean) == pytest.approx((x.min(), x.max(), x.mean()))
    assert s.std == pytest.approx(np.std(x, ddof=1))
    assert s.n == 537


@pytest.mark.parametrize("n", [6, 7, 10, 20, 31, 100])
def test_median_ci_ranks_are_the_tightest_exact_ones(n):
    cdf = lambda k: sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n   # P(B <= k), B ~ Bin(n, 1/2)
    j, k = quantile_ci_ranks(n, 0.5, 0.95)
    assert cdf(j - 1) <= 0.025 < cdf(j)          # lower tail within alpha/2, and j cannot grow
    assert 1 - cdf(k - 1) <= 0.025 < 1 - cdf(k - 2)
    assert j + k == n + 1                          # symmetric for the median


def test_no_ci_below_six_samples_and_known_table_values():
    assert quantile_ci_ranks(5) is None
    assert quantile_ci_ranks(100) == (40, 61)      # standard table value for n=100 at 95%


def test_median_ci_coverage_on_skewed_data():
    rng = np.random.default_rng(0)
    true_median = 1.0                              # lognormal(0, s) has median exp(0)
    hits = 0
    for _ in range(2000):
        lo, hi = quantile_ci(rng.lognormal(0, 0.5, 30))
        hits += lo <= true_median <= hi
    assert 0.94 <= hits / 2000 <= 0.99


def test_reliability_rule_and_warnings():
    assert [min_samples(q) for q in (50, 90, 95, 99)] == [20, 100, 200, 1000]
    s = summarize(np.random.default_rng(1).normal(10, 0.1, 200))
    assert s.reliable == {"p50": True, "p90": True, "p95": True, "p99": False}
    # an unreliable percentile is flagged, not warned about: tables leave it out (and a budget on it warns)
    assert not any("p99" in w for w in s.warnings)
    tiny = summarize([1.0, 1.1, 0.9, 1.0, 1.2])
    assert tiny.p50_ci is None and any("confidence interval" in w for w in tiny.warnings)


def test_noise_and_drift_warnings():
    noisy = summarize(np.random.default_rng(2).lognormal(0, 1.0, 60))
    assert any("noisy" in w for w in noisy.warnings)
    drift = summarize(np.r_[np.full(50, 1.0), np.full(50, 1.5)] + np.random.default_rng(3).normal(0, .01, 100))
    assert any("drift" in w for w in drift.warnings)


def test_paired_ratio():
    a = np.random.default_rng(4).lognormal(0, 0.2, 200)
    r = paired_ratio(a, 2 * a)
    assert r["median"] == pytest.approx(2.0) and r["ci"] == pytest.approx([2.0, 2.0]) and r["n"] == 200
