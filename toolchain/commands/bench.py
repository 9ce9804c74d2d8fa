"""`edgec bench`: latency of ONNX models / edgec packages on ONNX Runtime execution providers, and the release gate.
Thin: parse, call edgec.runtime, print. No torch import anywhere on this path."""
from __future__ import annotations

import sys

import click

from edgec.core.errors import BudgetExceeded, OptionError


def _stderr_progress():
    """Progress on stderr only: a live bar on a terminal, a line per phase and per ~25% in CI logs."""
    state = {"label": None, "next": 0.25}

    def progress(label: str, frac: float) -> None:
        if label != state["label"]:
            state["label"], state["next"] = label, 0.25
            click.echo(f"[edgec] {label}", err=True)
        elif frac >= state["next"]:
            state["next"] = frac + 0.25
            click.echo(f"[edgec] {label} {frac:.0%}", err=True)
    return progress


def _print_providers(as_json: bool) -> None:
    from edgec.runtime import list_providers
    rows = list_providers()
    if as_json:
        import json
        click.echo(json.dumps({"schema": "edgec.providers/1", "providers": rows}, indent=2))
        return
    for r in rows:
        mark = "available" if r["available"] else f"missing: {r['how_to_get']}"
        click.echo(f"{(r['ep'] or '-'):9} {r['ort_name']:28} {mark}")


@click.command("bench")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--ep", "eps", multiple=True, default=("cpu",), show_default=True,
              help="Execution provider: cpu, cuda, tensorrt or auto. Repeat to compare providers.")
@click.option("--threads", type=int, help="Intra-op threads (default: ONNX Runtime's choice, one per core).")
@click.option("--batch", type=int, help="Batch size for a dynamic leading dimension (default 1).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D,D,..",
              help="Concrete input shape, e.g. --shape input=1,3,224,224. Repeatable.")
@click.option("--warmup", default="10", show_default=True, help="Warm-up runs per model: a count (10) or a time (2s).")
@click.option("--runs", default="200", show_default=True,
              help="Timed runs per model: a count (200) or a time (10s). p90 needs 100, p99 needs 1000.")
@click.option("--budget", "budgets", multiple=True, metavar="METRIC=VALUE",
              help="Fail (exit 7) above this: p50|p90|p95|p99|mean|min|max|load|first=12ms, memory=200MB.")
@click.option("--baseline", type=click.Path(), help="An earlier `edgec bench --json` output to compare against.")
@click.option("--max-regression", default=None, metavar="PCT",
              help="With --baseline: fail when the median is slower by more than this, with 95% confidence "
                   "[default: 10%].")
@click.option("--json", "as_json", is_flag=True, help="Print the edgec.bench/1 JSON document on stdout, nothing else.")
@click.option("--record", is_flag=True, help="Write the results into the package manifest under latency.<ep>.")
@click.option("--list-providers", is_flag=True, help="List execution providers and exit.")
@click.option("--include-copies", is_flag=True, help="GPU: time host->device input and device->host output copies too.")
@click.option("--no-inspect", is_flag=True, help="Skip the profiling pass that counts CPU fallbacks and INT8 kernels.")
def bench_cmd(models, eps, threads, batch, shapes, warmup, runs, budgets, baseline, max_regression, as_json,
              record, list_providers, include_copies, no_inspect):
    """Benchmark MODELS (.onnx files or NAME.edgec packages), interleaved, and gate on latency budgets.

    Exit codes: 0 ok, 2 bad option/budget, 3 bad model, 4 bad shape, 6 provider unavailable, 7 budget breached.
    """
    from edgec.runtime import (benchmark, check_budgets, check_regression, document, load_baseline, parse_budget)
    from edgec.runtime import record as record_result
    from edgec.runtime.gate import parse_percent

    if list_providers:
        _print_providers(as_json)
        return
    if not models:
        raise OptionError("no model given; usage: edgec bench MODEL.onnx|NAME.edgec [...] (or --list-providers)")
    # Everything the user typed is checked before minutes of measuring.
    parsed = [parse_budget(b) for b in budgets]
    if max_regression is not None and not baseline:
        raise OptionError("--max-regression needs --baseline FILE (an earlier `edgec bench --json` output)")
    base = load_baseline(baseline) if baseline else None
    allowance = parse_percent(max_regression if max_regression is not None else "10%")
    if record:
        from pathlib import Path
        plain = [m for m in models if not Path(m, "manifest.json").is_file()]
        if plain:
            raise OptionError(f"--record writes into a package's manifest.json; {plain[0]} is not a package "
                              f"folder (build one with `edgec build`)")

    results = benchmark(models, eps, threads=threads, batch=batch, shapes=list(shapes) or None, warmup=warmup,
                        runs=runs, include_copies=include_copies, inspect=not no_inspect,
                        progress=_stderr_progress())

    breaches, warnings = check_budgets(results, parsed)
    if base is not None:
        more, w = check_regression(results, base, allowance)
        breaches += more
        warnings += w
    config = {"eps": list(eps), "threads": threads, "batch": batch, "shapes": list(shapes), "warmup": warmup,
              "runs": runs, "include_copies": include_copies, "inputs": "random",
              "interleaved": len(results) > 1}
    gate = {"budgets": [b.text for b in parsed], "baseline": baseline,
            "max_regression": allowance if base is not None else None,
            "breaches": [b.to_json() for b in breaches], "passed": not breaches}
    doc = document(results, config, gate)
    if record:
        for r in results:
            path = record_result(r)
            click.echo(f"[edgec] recorded latency.{r.ep} in {path}", err=True)

    if as_json:
        from edgec.runtime.report import print_json
        print_json(doc)
    else:
        from rich.console import Console
        from edgec.runtime.report import render_table
        # a pipe or CI log is not 80 columns wide; rich would otherwise squeeze the table to 80
        render_table(results, Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160))
    for r in results:
        for w in r.to_json()["warnings"]:
            click.echo(f"[edgec] warning: {w}", err=True)
    for w in warnings:
        click.echo(f"[edgec] warning: {w}", err=True)
    many = len(results) > 1
    for b in breaches:
        click.echo(b.line(many), err=True)
    if breaches:
        sys.stdout.flush()
        raise BudgetExceeded(f"{len(breaches)} budget(s) breached; the lines above give metric, measured and budget")
