"""edgec distill: a teacher trains a (pruned or smaller) student; one process, or many through
torch.distributed.run (--nproc-per-node, --nnodes ...)."""
from __future__ import annotations

import click

from edgec.commands import options as o
from edgec.commands.options import emit_json, json_option


@click.command("distill")
@o.SOURCE
@click.option("--student", type=click.Path(dir_okay=False), help="Student model file (e.g. from `edgec prune`).")
@click.option("--student-arch", help="Student architecture: a fresh one, or the arch of a --student checkpoint.")
@o.TRAIN
@o.LAUNCH
@o.BUILD.only("output", "force")
@json_option
def distill_cmd(student, student_arch, as_json, **kw):
    """Train a student (--student FILE or --student-arch SPEC) on MODEL's soft targets; write it to -o."""
    from edgec.distributed import run_distill
    spec, train = o.SOURCE.make(kw), o.TRAIN.values(kw)
    result = run_distill(spec, student, student_arch, train, o.LAUNCH.make(kw), output=kw["output"],
                         force=kw["force"])
    if result is None:  # a node other than rank 0's: that node writes nothing
        return
    if as_json:
        emit_json(result)
    else:
        _print(result)


def _print(r: dict) -> None:
    from edgec.commands.prune import _fmt

    def pct(v):
        return "-" if v is None else f"{v:.2f}%"
    click.echo(f"{'':16} {'teacher':>10} {'student':>10}")
    click.echo(f"{'params':16} {_fmt(r['teacher_params']):>10} {_fmt(r['params']):>10}")
    click.echo(f"{'FLOPs':16} {_fmt(r['teacher_flops']):>10} {_fmt(r['flops']):>10}")
    click.echo(f"{'accuracy':16} {pct(r['teacher_accuracy']):>10} {pct(r['best_accuracy']):>10}  "
               f"(student before: {pct(r['student_accuracy_before'])})")
    labelled = r.get("labels") or {}
    for spec in r.get("kd_loss", []):
        on = " + its labels" if spec["output"] in labelled else ""
        click.echo(f"loss on output {spec['output']}: {spec['kind']}{on} x{spec['weight']:g} ({spec['reason']})")
    kept = r["kept_epoch"]
    click.echo(f"{r['recipe']}: kept epoch {kept['epoch']} of {len(r['epochs'])} ({kept['reason']}), {r['seconds']:.0f}s, "
               f"{r['world_size']} process(es){', stopped early' if r['stopped_early'] else ''}")
    click.echo(f"wrote {r['output']}" if r["output"] else f"interrupted; continue with --resume ({r['checkpoint']})")
