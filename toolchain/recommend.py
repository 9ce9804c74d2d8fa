"""Which recipe to ship: the fastest (or smallest) one that meets every constraint, and why the others lose."""
from __future__ import annotations

from edgec.core.errors import OptionError

_LATENCY = ("p50", "p90", "p95", "p99", "mean", "min", "max")


def parse_budgets(texts) -> list:
    from edgec.runtime.gate import parse_budget
    budgets = [parse_budget(t) for t in texts]
    for b in budgets:
        if b.metric not in _LATENCY:
            raise OptionError(f"--budget {b.text}: compare gates latency only ({', '.join(_LATENCY)}); "
                              "use edgec bench for load/first/memory budgets")
    return budgets


def broken_constraints(row, opts, ep: str, budgets) -> list[str]:
    """What `row` (an edgec.compare.Row) breaks: its per-output checks against the FP32 model (the gate's lines,
    edgec.stages.score), latency budgets, size."""
    if row.error:
        return [f"failed: {row.error}"]
    broken = list(row.failures)   # every output against FP32: task figure drops, quantized recipes' SQNR
    lat = row.latency.get(ep) or {}
    for b in budgets:
        measured = lat.get(f"{b.metric}_ms")
        if measured is None:
            broken.append(f"{b.metric} not measured on {ep}")
        elif measured > b.limit:
            broken.append(f"{b.metric} {measured:.2f} ms > {b.limit:.2f} ms on {ep}")
    if opts.max_size is not None and (row.bytes or 0) > opts.max_size:
        broken.append(f"size {row.bytes / 1e6:.2f} MB > {opts.max_size / 1e6:.2f} MB")
    return broken


def recommend(rows: list, opts) -> dict:
    ep = opts.providers[0]
    budgets = parse_budgets(opts.budgets)
    verdicts = {r.recipe: broken_constraints(r, opts, ep, budgets) for r in rows}
    ok = [r for r in rows if not verdicts[r.recipe]]
    constraints = {"max_accuracy_drop": opts.max_accuracy_drop, "budgets": list(opts.budgets),
                   "max_size_bytes": opts.max_size, "provider": ep, "prefer": opts.prefer}
    if not ok:
        return {"recipe": None, "reason": "no recipe meets every constraint", "constraints": constraints,
                "rejected": verdicts}
    if opts.prefer == "size":
        best = min(ok, key=lambda r: (r.bytes, r.p50_ms or float("inf")))
        why = f"smallest ({best.bytes / 1e6:.2f} MB) of the {len(ok)} recipe(s) meeting every constraint"
    else:
        timed = [r for r in ok if r.p50_ms is not None]
        best = min(timed or ok, key=lambda r: (r.p50_ms or float("inf"), r.bytes))
        why = (f"fastest (p50 {best.p50_ms:.3f} ms on {ep}) of the {len(ok)} recipe(s) meeting every constraint"
               if best.p50_ms is not None else "meets every constraint (no latency measured)")
    return {"recipe": best.recipe, "reason": why, "constraints": constraints,
            "rejected": {k: v for k, v in verdicts.items() if v}}
