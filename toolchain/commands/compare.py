"""edgec compare: the compression recipes side by side, and the one to ship."""
from __future__ import annotations

import click

from edgec.commands.options import FINITE, data_options, emit_json, kd_options, model_options


def _size(ctx, param, value):
    if value is None:
        return None
    from edgec.core.errors import OptionError
    from edgec.runtime.gate import parse_size_mb
    try:
        return int(parse_size_mb(value) * 1e6)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None


@click.command("compare")
@model_options
@data_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for artifacts, results (reused by a rerun), report.md and plots.")
@click.option("--recipes", default=None, help="Comma-separated subset of: fp32, ptq-int8, fp16, prune-kd, "
                                              "prune-kd-ptq, qat-kd (default: all).")
@click.option("--calibration", "calibrations", multiple=True, type=click.Choice(["minmax", "entropy", "percentile"]),
              help="Calibration method(s) for ptq-int8, one row each (default: all three).")
@click.option("--ep", "providers", multiple=True, default=["cpu"], show_default=True, help="Execution provider(s).")
@click.option("--prune-ratio", type=FINITE, default=0.5, show_default=True)
@kd_options
@click.option("--qat-epochs", type=int, default=3, show_default=True)
@click.option("--bench-seconds", type=FINITE, default=3.0, show_default=True, help="Benchmark time per model.")
@click.option("--fresh", is_flag=True, help="Recompute every recipe instead of reusing saved results.")
@click.option("--max-accuracy-drop", type=FINITE, help="Constraint: points of accuracy a recipe may lose vs FP32.")
@click.option("--budget", "budgets", multiple=True, help="Constraint: latency on the first --ep, e.g. p90=10ms.")
@click.option("--max-size", callback=_size, help="Constraint: file size, e.g. 5MB.")
@click.option("--prefer", type=click.Choice(["latency", "size"]), default="latency", show_default=True)
@click.option("--package", "package_path", type=click.Path(), help="Write the recommended recipe as a .edgec package.")
@click.option("--force", is_flag=True, help="With --package: replace an existing package.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"recipes\": [...], ...} on stdout.")
def compare_cmd(model, arch, input_shape, trust_pickle, data, eval_data, image_size, mean, std, output, recipes,
                calibrations, providers, prune_ratio, epochs, qat_epochs, lr, alpha, temperature, bench_seconds, fresh,
                max_accuracy_drop, budgets, max_size, prefer, package_path, force, as_json):
    """Compare compression recipes on your model and data: size, FLOPs, accuracy, latency, in one table and plot."""
    from edgec.compare import RECIPES, CompareOptions, package_winner, run_compare
    from edgec.core.fsutil import check_writable
    from edgec.report import print_compare
    if package_path:  # checked before the comparison runs, not after minutes of work
        check_writable(package_path, force, inputs=(model, data, eval_data, output), directory=True)
    opts = CompareOptions(
        model=model, output=output, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape, data=data,
        eval_data=eval_data, image_size=image_size, mean=mean, std=std,
        recipes=tuple(r.strip() for r in recipes.split(",")) if recipes else tuple(RECIPES),
        calibrations=tuple(calibrations) or ("minmax", "entropy", "percentile"), providers=tuple(providers),
        prune_ratio=prune_ratio, epochs=epochs, qat_epochs=qat_epochs, lr=lr, alpha=alpha, temperature=temperature,
        bench_seconds=bench_seconds,
        fresh=fresh, max_accuracy_drop=max_accuracy_drop, budgets=tuple(budgets), max_size=max_size, prefer=prefer)
    summary = run_compare(opts)
    if package_path:
        summary["package"] = package_winner(opts, summary, package_path, force)
    if as_json:
        emit_json(summary)
    else:
        print_compare(summary)
        click.echo(f"report: {output}/report.md, plots: {', '.join(summary.get('plots', []))}")
        if package_path:
            click.echo(f"package: {package_path}")
