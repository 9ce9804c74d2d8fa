"""Latency statistics that say how far they can be trusted.

Percentiles use numpy's default (linear interpolation between order statistics). Confidence intervals for a
quantile are distribution-free: with n samples, the number below the true q-quantile is Binomial(n, q), so the
order statistics X(j) and X(k) bracket it with probability P(j <= B <= k-1). No normality is assumed, which
matters because latency distributions are skewed and multi-modal.

Reliability rule for a percentile q: at least 10 samples beyond it, i.e. n >= 10 / (1 - q)
(p50: 20, p90: 100, p95: 200, p99: 1000). Below that the reported value is one or two extreme samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
CI_LEVEL = 0.95
NOISY_CI_HALF_WIDTH = 0.05     # median CI wider than +-5% of the median: too noisy for a 10% gate
DRIFT = 0.10                   # median of the second half of the run differs from the first half by >10%


def min_samples(q: float) -> int:
    """Samples needed before percentile q (0..100) is reported as reliable: 10 beyond it."""
    return math.ceil(10 / (1 - q / 100) - 1e-9)


def _binom_cdf_table(n: int, p: float) -> np.ndarray:
    """cdf[k] = P(B <= k) for B ~ Binomial(n, p), k = 0..n; log-space so n in the millions does not overflow."""
    i = np.arange(1, n + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))])
    k = np.arange(n + 1, dtype=np.float64)
    log_pmf = log_comb + k * math.log(p) + (n - k) * math.log1p(-p)
    pmf = np.exp(log_pmf - log_pmf.max())
    return np.cumsum(pmf) / pmf.sum()


def quantile_ci_ranks(n: int, q: float = 0.5, level: float = CI_LEVEL) -> tuple[int, int] | None:
    """1-based ranks (j, k) with P(X(j) <= true q-quantile <= X(k)) >= level, each tail <= (1-level)/2.
    None when n is too small for any such interval (e.g. n < 6 for the median at 95%)."""
    if n < 1:
        return None
    alpha = (1 - level) / 2
    cdf = _binom_cdf_table(n, q)
    eps = 1e-12   # float summation noise must not flip an exact tail probability over alpha
    # j: largest rank with P(B <= j-1) <= alpha; k: smallest rank with P(B >= k) = 1 - P(B <= k-1) <= alpha.
    j = int(np.searchsorted(cdf, alpha + eps, side="right"))
    k = int(np.searchsorted(cdf, 1 - alpha - eps, side="left")) + 1
    if j < 1 or k > n:
        return None
    return j, k


def quantile_ci(samples, q: float = 0.5, level: float = CI_LEVEL) -> tuple[float, float] | None:
    ranks = quantile_ci_ranks(len(samples), q, level)
    if ranks is None:
        return None
    s = np.sort(np.asarray(samples, dtype=np.float64))
    return float(s[ranks[0] - 1]), float(s[ranks[1] - 1])


@dataclass
class Summary:
    """Latency summary in milliseconds."""
    n: int
    min: float
    mean: float
    std: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    p50_ci: list[float] | None
    ci_level: float = CI_LEVEL
    reliable: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def summarize(samples_ms, label: str = "") -> Summary:
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    p = {f"p{q}": float(np.percentile(x, q)) for q in PERCENTILES}
    ci = quantile_ci(x, 0.5)
    reliable = {f"p{q}": x.size >= min_samples(q) for q in PERCENTILES}
    where = f"{label}: " if label else ""
    warnings = []
    if ci is None:
        warnings.append(f"{where}{x.size} runs are too few for a confidence interval of the median (need >= 6)")
    elif p["p50"] > 0 and (ci[1] - ci[0]) / 2 > NOISY_CI_HALF_WIDTH * p["p50"]:
        warnings.append(f"{where}noisy: the median's {CI_LEVEL:.0%} CI is +-{50 * (ci[1] - ci[0]) / p['p50']:.0f}%; "
                        f"run longer or quiet the machine before trusting small differences")
    if x.size >= 40:
        a, b = np.median(x[: x.size // 2]), np.median(x[x.size // 2:])
        if abs(b - a) > DRIFT * min(a, b):
            warnings.append(f"{where}drift: median moved from {a:.3g} to {b:.3g} ms between the run's halves "
                            f"(thermal throttling or other load?); compare ratios from interleaved runs")
    return Summary(n=int(x.size), min=float(x.min()), mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1
                   else 0.0, max=float(x.max()), p50_ci=list(ci) if ci else None, reliable=reliable,
                   warnings=warnings, **p)


def paired_ratio(a_ms, b_ms) -> dict | None:
    """Median of per-round ratios b/a with its CI. Rounds are interleaved, so each pair shares the machine's
    state at that moment and the ratio cancels slow drift that would bias a ratio of two medians."""
    n = min(len(a_ms), len(b_ms))
    if n == 0:
        return None
    r = np.asarray(b_ms[:n], dtype=np.float64) / np.asarray(a_ms[:n], dtype=np.float64)
    ci = quantile_ci(r, 0.5)
    return {"median": float(np.median(r)), "ci": list(ci) if ci else None, "n": int(n)}
