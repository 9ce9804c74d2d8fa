"""edgec compare: the compression recipes side by side, and the one to ship."""
from __future__ import annotations

import click

from edgec.commands import options as o
from edgec.commands.options import emit_json, json_option


@click.command("compare")
@o.SOURCE
@o.COMPARE
@o.KD
@json_option
def compare_cmd(as_json, **kw):
    """Compare compression recipes on your model and data: size, FLOPs, accuracy, latency, in one table and plot."""
    from edgec.compare import run_compare
    from edgec.report import print_compare
    from edgec.commands.build import with_label_output
    opts = o.COMPARE.make(kw, source=o.SOURCE.make(kw),
                          distill=with_label_output(o.KD.make(kw), kw["label_output"]))
    summary = run_compare(opts)
    if as_json:
        emit_json(summary)
        return
    print_compare(summary)
    click.echo(f"report: {opts.output}/report.md, plots: {', '.join(summary.get('plots', []))}")
    if opts.package:
        click.echo(f"package: {opts.package}")
