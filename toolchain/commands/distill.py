"""edgec distill: a teacher trains a (pruned or smaller) student; one process, or many through
torch.distributed.run (--nproc-per-node, --nnodes ...)."""
from __future__ import annotations

import click

from edgec.commands.options import FINITE, data_options, emit_json, kd_options, model_options, output_options


def _hint(ctx, param, values):
    out = []
    for v in values:
        s, _, t = v.partition(":")
        if not s:
            raise click.BadParameter(f"{v!r}: expected STUDENT_LAYER[:TEACHER_LAYER], e.g. layer3:layer3")
        out.append((s, t or s))
    return tuple(out)


@click.command("distill")
@model_options
@click.option("--student", type=click.Path(dir_okay=False), help="Student model file (e.g. from `edgec prune`).")
@click.option("--student-arch", help="Student architecture: a fresh one, or the arch of a --student checkpoint.")
@data_options
@kd_options
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=FINITE, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--hint", "hints", multiple=True, callback=_hint,
              help="Feature loss STUDENT_LAYER[:TEACHER_LAYER] (repeatable), e.g. layer3.")
@click.option("--hint-weight", type=FINITE, default=1.0, show_default=True)
@click.option("--kd-loss", "kd_loss", multiple=True, metavar="OUTPUT=KIND[:WEIGHT]",
              help="Loss of one output: kl (logits), bce (probabilities), mse (regression), cosine (embeddings), "
                   "e.g. 0=bce or output_1=mse:0.5 (repeatable; default: chosen from the teacher's outputs).")
@click.option("--label-output", help="The output the labels belong to (position or name; default: the first).")
@click.option("--no-augment", is_flag=True, help="No random translation of training images (only image inputs are ever translated).")
@click.option("--patience", type=int, help="Stop after this many epochs without a better eval accuracy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.ckpt.")
@click.option("--nproc-per-node", type=int, default=1, show_default=True,
              help="Processes (GPUs) on this machine; >1 launches DDP through torch.distributed.run.")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Machines taking part.")
@click.option("--node-rank", type=int, default=0, show_default=True, help="This machine's index.")
@click.option("--master-addr", help="Host of node rank 0 (several machines).")
@click.option("--master-port", type=int, help="Port on the master (default 29500; a free one on a single node).")
@output_options
def distill_cmd(model, arch, input_shape, trust_pickle, student, student_arch, data, eval_data, image_size, mean,
                std, epochs, batch_size, lr, optimizer, weight_decay, schedule, alpha, temperature, hints,
                hint_weight, kd_loss, label_output, no_augment, patience, seed, device, resume, nproc_per_node, nnodes, node_rank,
                master_addr, master_port, output, force, as_json):
    """Train a student (--student FILE or --student-arch SPEC) on MODEL's soft targets; write it to -o."""
    from edgec.distill import DistillJob, run_job
    from edgec.distributed import Launch, launch
    from edgec.core.fsutil import check_writable
    from edgec.kdloss import parse as parse_kd_loss
    train_cfg = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                     schedule=schedule, alpha=alpha, temperature=temperature, augment=False if no_augment else None, seed=seed,
                     patience=patience, hints=[list(h) for h in hints], hint_weight=hint_weight, resume=resume,
                     device=device, kd_loss=[list(t) for t in parse_kd_loss(kd_loss)], label_output=label_output)
    job = DistillJob(teacher=model, output=output, arch=arch, input_shape=list(input_shape) if input_shape else None,
                     trust_pickle=trust_pickle, student=student, student_arch=student_arch, data=data,
                     eval_data=eval_data, image_size=image_size, mean=list(mean) if mean else None,
                     std=list(std) if std else None, force=force, train=train_cfg)
    job.config().validate()  # bad options fail here, before processes start
    if not (student or student_arch):
        from edgec.core.errors import OptionError
        raise OptionError("pass --student FILE (e.g. the output of `edgec prune`) or --student-arch SPEC")
    check_writable(output, force, inputs=(model, student, data, eval_data))
    ddp = Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port)
    ddp.validate()
    result = launch(job, ddp) if ddp.distributed else run_job(job)
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
    for spec in r.get("kd_loss", []):
        click.echo(f"loss on output {spec['output']}: {spec['kind']} x{spec['weight']:g} ({spec['reason']})")
    kept = r["kept_epoch"]
    click.echo(f"{r['recipe']}: kept epoch {kept['epoch']} of {len(r['epochs'])} ({kept['reason']}), {r['seconds']:.0f}s, "
               f"{r['world_size']} process(es){', stopped early' if r['stopped_early'] else ''}")
    click.echo(f"wrote {r['output']}" if r["output"] else f"interrupted; continue with --resume ({r['checkpoint']})")
