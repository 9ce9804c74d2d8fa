"""The `edgec-runtime` command line (the lean, torch-free distribution for devices and CI runners): `bench`, the
latency gate, plus the package commands (inspect, verify, ...). The full `edgec` mounts the very same `bench`
command, so both gate with one implementation, one JSON schema and the same exit codes."""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading
import time

import click

from edgec.core import __version__
from edgec.core.errors import BudgetExceeded, DataError, EdgecError, OptionError


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
@click.option("--threads", type=click.IntRange(min=1),
              help="Intra-op threads (default: ONNX Runtime's choice, one per core).")
@click.option("--batch", type=click.IntRange(min=1), help="Batch size for a dynamic leading dimension (default 1).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D,D,..",
              help="Concrete input shape, e.g. --shape input=1,3,224,224. Repeatable.")
@click.option("--warmup", default="10", show_default=True, help="Warm-up runs per model: a count (10) or a time (2s).")
@click.option("--runs", default=None,
              help="Timed runs per model: a count or a time (10s) [default: 200, or 1000 with a p99 budget: enough "
                   "for every percentile reported or gated; p95 needs 200, p99 1000].")
@click.option("--budget", "budgets", multiple=True, metavar="METRIC=VALUE",
              help="Fail (exit 7) above this: p50|p90|p95|p99|mean|min|max|load|first=12ms, memory=200MB.")
@click.option("--baseline", type=click.Path(), help="An earlier `edgec bench --json` output to compare against.")
@click.option("--max-regression", default=None, metavar="PCT",
              help="With --baseline: fail when the median is slower by more than this, with 95% confidence "
                   "[default: 10%].")
@click.option("--json", "as_json", is_flag=True, help="Print the edgec.bench/1 JSON document on stdout, nothing else.")
@click.option("--junit", type=click.Path(dir_okay=False),
              help="Write a JUnit XML report: one test case per model, provider and check (replaced on each run).")
@click.option("--markdown", type=click.Path(dir_okay=False),
              help="Write the gate and latency tables as markdown (also appended to $GITHUB_STEP_SUMMARY when set).")
@click.option("--record", is_flag=True, help="Write the results into the package manifest under latency.<ep>.")
@click.option("--list-providers", is_flag=True, help="List execution providers and exit.")
@click.option("--include-copies", is_flag=True, help="GPU: time host->device input and device->host output copies too.")
@click.option("--no-inspect", is_flag=True, help="Skip the profiling pass that counts CPU fallbacks and INT8 kernels.")
def bench_cmd(models, eps, threads, batch, shapes, warmup, runs, budgets, baseline, max_regression, as_json,
              junit, markdown, record, list_providers, include_copies, no_inspect):
    """Benchmark MODELS (.onnx files or NAME.edgec packages), interleaved, and gate on latency budgets.

    Exit codes: 0 ok, 2 bad option/budget, 3 bad model, 4 bad shape, 6 provider unavailable, 7 budget breached.
    """
    from edgec.runtime import benchmark, document, load_baseline, parse_budget
    from edgec.runtime import record as record_result
    from edgec.runtime.gate import budget_checks, parse_percent, regression_checks

    if list_providers:
        _print_providers(as_json)
        return
    if not models:
        prog = click.get_current_context().command_path
        raise OptionError(f"no model given; usage: {prog} MODEL.onnx|NAME.edgec [...] (or --list-providers)")
    # Everything the user typed is checked before minutes of measuring.
    parsed = [parse_budget(b) for b in budgets]
    runs = runs if runs is not None else default_runs(parsed)
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

    started = time.perf_counter()
    results = benchmark(models, eps, threads=threads, batch=batch, shapes=list(shapes) or None, warmup=warmup,
                        runs=runs, include_copies=include_copies, inspect=not no_inspect,
                        progress=_stderr_progress())
    seconds = time.perf_counter() - started

    checks, warnings = budget_checks(results, parsed)
    if base is not None:
        more, w = regression_checks(results, base, allowance)
        checks += more
        warnings += w
    breaches = [c for c in checks if not c.passed]
    config = {"eps": list(eps), "threads": threads, "batch": batch, "shapes": list(shapes), "warmup": warmup,
              "runs": runs, "include_copies": include_copies, "inputs": "random",
              "interleaved": len(results) > 1}
    gate = {"budgets": [b.text for b in parsed], "baseline": baseline,
            "max_regression": allowance if base is not None else None,
            "breaches": [b.to_json() for b in breaches], "passed": not breaches}
    doc = document(results, config, gate)
    _ci_reports(results, checks, not breaches, seconds, doc["created"], junit, markdown)
    if record:
        from pathlib import Path

        from edgec.core.package import SIGNATURE_FILE
        for r in results:
            path = record_result(r)
            click.echo(f"[edgec] recorded latency.{r.ep} in {path}", err=True)
        for folder in dict.fromkeys(Path(r.path) for r in results):
            if (folder / SIGNATURE_FILE).is_file():   # said, not left for `verify --key` to find out on the device
                click.echo(f"[edgec] warning: {folder} was signed; recording changed its manifest, so its "
                           f"{SIGNATURE_FILE} no longer matches: sign it again (edgec sign {folder} --key NAME.key)",
                           err=True)

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
    if checks:
        shown = "; ".join(f"{c.model} [{c.ep}] {c.metric} {c.figure()}" for c in checks[:3])
        more = f"; +{len(checks) - 3} more" if len(checks) > 3 else ""
        click.echo(f"gate passed: {len(checks)} check(s): {shown}{more}", err=True)


def default_runs(budgets) -> str:
    """Enough timed runs for every percentile the table reports (up to p95: 200) and every one a budget gates."""
    from edgec.runtime.stats import min_samples
    gated = [min_samples(int(b.metric[1:])) for b in budgets if b.metric in ("p50", "p90", "p95", "p99")]
    return str(max([200, *gated]))


def _ci_reports(results, checks, passed, seconds, created, junit, markdown) -> None:
    from edgec.runtime import ci
    if junit:
        ci.write_report(junit, ci.junit_xml(results, checks, seconds, created))
        click.echo(f"[edgec] JUnit report: {junit}", err=True)
    text = ci.markdown(results, checks, passed)
    if markdown:
        ci.write_report(markdown, text)
        click.echo(f"[edgec] markdown summary: {markdown}", err=True)
    ci.append_step_summary(text)


# Torch-free package commands, mounted when they exist (edgec.runtime.package_cmds).
PACKAGE_COMMANDS = ("inspect", "verify", "sign", "keygen")


def _package_commands() -> list[click.Command]:
    try:
        mod = importlib.import_module("edgec.runtime.package_cmds")
    except ModuleNotFoundError as e:
        if e.name == "edgec.runtime.package_cmds":
            return []
        raise
    return [getattr(mod, f"{name}_cmd") for name in PACKAGE_COMMANDS if hasattr(mod, f"{name}_cmd")]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgec-runtime")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def cli(debug):
    """edgec-runtime: gate and check edgec packages on the device, without torch."""
    from edgec.runtime.install import check_install
    check_install()


cli.add_command(bench_cmd)
for _cmd in _package_commands():
    cli.add_command(_cmd)


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI timeouts, `timeout`, containers) unwinds like Ctrl-C: every temporary output is removed."""


# After SIGTERM the unwinding gets this long to end the process; then it is ended without it (the temporaries
# are removed from fsutil's record). Code that swallows a KeyboardInterrupt (a bare `except:`) must not keep a
# terminated build running to the end.
TERMINATE_GRACE_S = 30.0


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# What the SIGTERM handler tells the watchdog thread. The handler itself starts no thread and takes no lock: it
# can run in the middle of any bytecode, Thread.start()'s own locked section included (a Timer started there
# deadlocked a test under load).
_sigterm = {"first": None, "again": False, "raised": None}


def _terminate(prog_name: str, signum, frame):
    now = time.monotonic()
    _sigterm["first"] = _sigterm["first"] or now
    if _in_import(frame) and now - _sigterm["first"] < TERMINATE_GRACE_S:
        # An exception raised inside an import runs through native modules' initialisers, where it was seen to
        # be swallowed or to end in SIGABRT after a traceback: the watchdog sends the signal again shortly.
        _sigterm["again"] = True
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    _sigterm["raised"] = now
    raise Terminated()


def _watchdog(prog_name: str, running: list) -> None:
    """Daemon thread, for as long as the command runs: sends a deferred SIGTERM again, and ends the process when
    the unwinding after one has not within TERMINATE_GRACE_S (temporaries removed from fsutil's record)."""
    from edgec.core.fsutil import remove_live_temporaries
    while running[0]:
        time.sleep(0.02 if _sigterm["first"] else 0.25)
        if _sigterm["again"]:
            _sigterm["again"] = False
            os.kill(os.getpid(), signal.SIGTERM)
        raised = _sigterm["raised"]
        if raised is not None and time.monotonic() - raised > TERMINATE_GRACE_S:
            remove_live_temporaries()
            os.write(2, f"{prog_name}: terminated (without unwinding: it took over {TERMINATE_GRACE_S:.0f} s)\n"
                     .encode())
            os._exit(143)   # no flush: the main thread may hold the stream locks


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. The unwinding has removed every temporary by now; what is left is
    the native libraries' shutdown, and after a signal it sometimes crashed (SIGABRT / SIGSEGV instead of 143, about
    one build in ten in the whole suite) while ONNX Runtime's or torch's threads were still up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(group: click.Group, prog_name: str, argv=None) -> None:
    """Run a click group the edgec way (both `edgec` and `edgec-runtime`): a user mistake is one
    `PROG: error: ...` line on stderr and its documented exit code (edgec.core.errors); anything else is our bug,
    exit 1 (--debug shows the traceback); SIGTERM exits 143 after the same cleanup as Ctrl-C."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, functools.partial(_terminate, prog_name)) if in_main else None
    running = [True]
    if in_main:
        threading.Thread(target=_watchdog, args=(prog_name, running), name="edgec-sigterm", daemon=True).start()
    try:
        _run(group, prog_name, argv)
    except Terminated:  # raised where click does not turn it into Abort (between its handlers)
        click.echo(f"{prog_name}: terminated", err=True)
        _exit_now(143)
    finally:
        running[0] = False
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(group: click.Group, prog_name: str, argv=None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and so SIGTERM) into Abort
        if isinstance(e.__cause__, Terminated):
            click.echo(f"{prog_name}: terminated", err=True)
            _exit_now(143)
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # one line like every other user error, plus where to look
        cmd = f"{e.ctx.command_path} --help" if e.ctx is not None else f"{prog_name} --help"
        click.echo(f"{prog_name}: error: {e.format_message()} (see {cmd})", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"{prog_name}: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except EdgecError as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(f"{prog_name}: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except MemoryError:   # past every estimate: still one line with the fix, never a traceback
        click.echo(f"{prog_name}: error: out of memory; use fewer --samples, smaller --eval-data or a smaller input "
                   f"shape", err=True)
        sys.exit(DataError.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # our bug, not the user's
        if debug:
            raise
        click.echo(f"{prog_name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(1)
    sys.exit(0)


def main(argv=None):
    run(cli, "edgec-runtime", argv)


if __name__ == "__main__":
    main()
