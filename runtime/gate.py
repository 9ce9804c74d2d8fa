"""The release gate: absolute budgets (`p90=12ms`) and regression against a baseline run (`--max-regression 10%`).

Budget rule: a budget is breached when the measured point value exceeds it (p-latencies, mean, load, first in ms;
memory in MB = 10^6 bytes). A percentile that the run has too few samples for (see stats.min_samples) is still
gated, with a warning, so a short CI run cannot pass by accident.

Regression rule: for each (model, ep) in the baseline, the new run regresses when the LOWER bound of the new median's
95% confidence interval exceeds baseline median x (1 + max_regression). One slow sample or a noisy run cannot fail
the gate; a real slowdown beyond the allowance does, at 97.5% one-sided confidence.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from edgec.core.errors import OptionError
from edgec.runtime.stats import min_samples, quantile_ci

LATENCY_METRICS = ("p50", "p90", "p95", "p99", "mean", "min", "max")
METRICS = LATENCY_METRICS + ("load", "first", "memory")
_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SIZE = {"kb": 1e-3, "mb": 1.0, "gb": 1e3, "kib": 1024 / 1e6, "mib": 1024 ** 2 / 1e6, "gib": 1024 ** 3 / 1e6}
SCHEMA = "edgec.bench/1"


@dataclass(frozen=True)
class Budget:
    metric: str
    limit: float          # ms, or MB for memory
    text: str             # as the user wrote it

    @property
    def unit(self) -> str:
        return "MB" if self.metric == "memory" else "ms"


@dataclass
class Check:
    """One gate check of one (model, ep): a budget or the baseline regression test, passed or breached. `ci` is the
    95% confidence interval of the measured figure where the run gives one (percentiles, mean), else None."""
    model: str
    ep: str
    metric: str
    measured: float
    limit: float
    unit: str
    kind: str             # "budget" | "regression"
    detail: str = ""
    passed: bool = False
    ci: list[float] | None = None
    budget: str = ""      # as the user wrote it ("p90=12ms"), or "+10%" for a regression check

    @property
    def name(self) -> str:
        return f"regression {self.metric} {self.budget} vs baseline" if self.kind == "regression" else \
            f"budget {self.budget}"

    def figure(self) -> str:
        """'13.20 ms (95% CI 13.01-13.52) > budget 12.00 ms': what a CI report shows for this check."""
        ci = f" (95% CI {self.ci[0]:.3f}-{self.ci[1]:.3f})" if self.ci else ""
        sign = "<=" if self.passed else ">"
        what = "allowed" if self.kind == "regression" else "budget"
        return f"{self.measured:.3f} {self.unit}{ci} {sign} {what} {self.limit:.3f} {self.unit}"

    def line(self, many_models: bool = True) -> str:
        where = f" ({self.model} on {self.ep})" if many_models else ""
        if self.kind == "regression":
            return (f"budget breached: {self.metric} regression measured {self.measured:.2f} {self.unit} "
                    f"{self.detail} > allowed {self.limit:.2f} {self.unit}{where}")
        return f"budget breached: {self.metric} measured {self.measured:.2f} {self.unit} > budget " \
               f"{self.limit:.2f} {self.unit}{where}"

    def to_json(self) -> dict:
        return asdict(self)


Breach = Check   # a Check that did not pass; the name the Python API has always used


def parse_budget(text: str) -> Budget:
    """'p90=12ms', 'load=0.3s', 'memory=200MB' -> Budget. Units are required so that 12 never means 12 seconds."""
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*=\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m:
        raise OptionError(f"malformed --budget {text!r}; write METRIC=VALUE with a unit, e.g. p90=12ms, "
                          f"load=300ms, memory=200MB")
    metric, value, unit = m.group(1).lower(), float(m.group(2)), m.group(3).lower()
    if metric not in METRICS:
        raise OptionError(f"--budget {text!r}: unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    table = _SIZE if metric == "memory" else _TIME
    if unit not in table:
        example = "200MB" if metric == "memory" else "12ms"
        raise OptionError(f"--budget {text!r}: {'missing' if not unit else 'unknown'} unit for {metric}; "
                          f"write e.g. {metric}={example} (units: {', '.join(table)})")
    return Budget(metric, value * table[unit], text.strip())


def parse_size_mb(text: str) -> float:
    """'5MB', '800KB', '1.5GiB' -> megabytes (10^6 bytes). A unit is required."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text or "")
    if not m or m.group(2).lower() not in _SIZE:
        raise OptionError(f"{text!r}: expected a size with a unit like 5MB or 800KB (units: {', '.join(_SIZE)})")
    return float(m.group(1)) * _SIZE[m.group(2).lower()]


def parse_percent(text) -> float:
    """'10%', '10', '0.1' is NOT accepted as 10% (ambiguous): a plain number is percent."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", str(text))
    if not m:
        raise OptionError(f"--max-regression {text!r} is not a percentage; write e.g. --max-regression 10%")
    return float(m.group(1)) / 100


def _ci(result, metric: str) -> list[float] | None:
    """95% CI of a gated figure from the run's own samples: distribution-free for percentiles, normal for the
    mean; None for single measurements (load, first, memory) and extremes."""
    samples = getattr(result, "samples_ms", None)
    if not samples:
        return None
    if metric in ("p50", "p90", "p95", "p99"):
        ci = quantile_ci(samples, int(metric[1:]) / 100)
        return list(ci) if ci else None
    if metric == "mean" and result.latency.n > 1:
        half = 1.96 * result.latency.std / math.sqrt(result.latency.n)
        return [result.latency.mean - half, result.latency.mean + half]
    return None


def budget_checks(results, budgets: list[Budget]) -> tuple[list[Check], list[str]]:
    """Every budget on every result, passed or not, and warnings for what could not be checked reliably."""
    checks, warnings = [], []
    for r in results:
        for b in budgets:
            value = r.metric(b.metric)
            if value is None:
                warnings.append(f"{r.model} [{r.ep}]: {b.metric} was not measured on this platform; "
                                f"budget {b.text} not checked")
                continue
            if b.metric in r.latency.reliable and not r.latency.reliable[b.metric]:
                warnings.append(f"{r.model} [{r.ep}]: budget {b.text} is gated on a {b.metric} from "
                                f"{r.latency.n} runs, too few to be reliable (needs {min_samples(int(b.metric[1:]))})")
            checks.append(Check(r.model, r.ep, b.metric, value, b.limit, b.unit, "budget", passed=value <= b.limit,
                                ci=_ci(r, b.metric), budget=b.text))
    return checks, warnings


def check_budgets(results, budgets: list[Budget]) -> tuple[list[Breach], list[str]]:
    checks, warnings = budget_checks(results, budgets)
    return [c for c in checks if not c.passed], warnings


def load_baseline(path) -> list[dict]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise OptionError(f"baseline not found: {p}; create one with `edgec bench MODEL --json > {p.name}`") from None
    except (OSError, ValueError) as e:
        raise OptionError(f"baseline {p} is not a JSON file ({e}); create it with `edgec bench --json`") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("results"), list):
        raise OptionError(f"baseline {p} is not an {SCHEMA} document; create it with `edgec bench MODEL --json`")
    for i, r in enumerate(doc["results"]):
        p50 = r.get("latency_ms", {}).get("p50") if isinstance(r, dict) and isinstance(r.get("latency_ms"), dict) \
            else None
        if not (isinstance(r, dict) and isinstance(r.get("ep"), str) and isinstance(p50, (int, float))
                and not isinstance(p50, bool) and 0 < p50 < math.inf):
            raise OptionError(f"baseline {p}: result {i} lacks a provider (ep) and a positive latency_ms.p50; "
                              "create the baseline with `edgec bench MODEL --json`")
    return doc["results"]


def _match(result, baseline: list[dict]) -> dict | None:
    same_ep = [b for b in baseline if b.get("ep") == result.ep]
    named = [b for b in same_ep if b.get("model") == result.model]
    if named:
        return named[0]
    # a renamed package (new.edgec vs old.edgec) still matches when the baseline has one model on that ep
    return same_ep[0] if len(same_ep) == 1 else None


def regression_checks(results, baseline: list[dict], max_regression: float) -> tuple[list[Check], list[str]]:
    checks, warnings = [], []
    for r in results:
        base = _match(r, baseline)
        if base is None:
            warnings.append(f"{r.model} [{r.ep}]: no baseline result for this model and provider; not compared")
            continue
        base_p50 = float(base["latency_ms"]["p50"])
        allowed = base_p50 * (1 + max_regression)
        ci = r.latency.p50_ci
        if ci is None:
            warnings.append(f"{r.model} [{r.ep}]: too few runs for a confidence interval; regression not checked")
            continue
        checks.append(Check(r.model, r.ep, "p50", r.latency.p50, allowed, "ms", "regression",
                            f"(95% CI {ci[0]:.2f}-{ci[1]:.2f}, baseline {base_p50:.2f} +{max_regression:.0%})",
                            passed=ci[0] <= allowed, ci=list(ci), budget=f"+{max_regression:.0%}"))
        if ci[0] <= allowed < ci[1]:
            warnings.append(f"{r.model} [{r.ep}]: p50 {r.latency.p50:.2f} ms may exceed baseline {base_p50:.2f} ms "
                            f"+{max_regression:.0%} (CI upper bound {ci[1]:.2f} ms); not conclusive, run longer")
    return checks, warnings


def check_regression(results, baseline: list[dict], max_regression: float) -> tuple[list[Breach], list[str]]:
    checks, warnings = regression_checks(results, baseline, max_regression)
    return [c for c in checks if not c.passed], warnings
