"""edgec prune: remove whole channels (structured pruning) and write a self-describing model file."""
from __future__ import annotations

import click

from edgec.commands import options as o
from edgec.commands.options import emit_json, json_option


@click.command("prune")
@o.SOURCE.only("model", "arch", "input_shape", "trust_pickle", "data", "image_size", "mean", "std",
               data=o.Flag(("--data",), "Samples for --importance taylor (and the input shape when the model has "
                                         "none)."))
@o.PRUNE
@click.option("--dry-run", is_flag=True, help="Print the dependency groups and the channel plan; write nothing.")
@o.BUILD.only("output", "force", output=o.Flag(("-o", "--output"), "Output model file (required unless --dry-run).",
                                               click={"type": click.Path()}))
@json_option
def prune_cmd(dry_run, as_json, **kw):
    """Remove channels from MODEL (dependency-aware) and save the smaller model to -o."""
    from edgec.prune import plan_pruning, prune_file
    spec = o.SOURCE.only("model", "arch", "input_shape", "trust_pickle", "data", "image_size", "mean", "std").make(kw)
    cfg = o.PRUNE.make(kw)
    if dry_run:
        return _dry_run(plan_pruning(spec, cfg), as_json)
    record = prune_file(spec, cfg, kw["output"], force=kw["force"])
    result = {"output": str(kw["output"]), **{k: v for k, v in record.items() if k != "channels"},
              "layers_changed": len(record["channels"])}
    if as_json:
        emit_json(result | {"channels": record["channels"]})
    else:
        _print_record(result)


def _fmt(n) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _print_record(r: dict) -> None:
    click.echo(f"{'':10} {'before':>10} {'after':>10} {'reduction':>10}")
    click.echo(f"{'params':10} {_fmt(r['params_before']):>10} {_fmt(r['params_after']):>10} "
               f"{r['params_reduction']:>9}x")
    click.echo(f"{'FLOPs':10} {_fmt(r['flops_before']):>10} {_fmt(r['flops_after']):>10} "
               f"{(r['flops_reduction'] or '?'):>9}x")
    inputs = r["input_shape"] if r["input_shape"] is not None else \
        ", ".join(f"{k} {v}" for k, v in (r.get("inputs") or {}).items())
    click.echo(f"channel ratio {r['ratio']}, {r['layers_changed']} layers changed; FLOPs at batch 1, "
               f"input {inputs} (2 per multiply-add)")
    _print_recurrent(r)
    click.echo(f"wrote {r['output']}")


def _print_recurrent(r: dict) -> None:
    regrouped = r.get("regroupings")
    if regrouped:
        ops = ", ".join(f"{op} x{n}" for op, n in regrouped["ops"].items())
        where = ", ".join(regrouped["where"][:4]) + (", ..." if len(regrouped["where"]) > 4 else "")
        kept = regrouped["kept"]
        click.echo(f"channel regroupings ({ops}) in {where}: {len(kept)} layers keep their output channels, "
                   f"{regrouped['why']}" + (f": {', '.join(kept[:6])}{', ...' if len(kept) > 6 else ''}"
                                            if kept else ""))
    for name, rec in (r.get("recurrent") or {}).items():
        click.echo(f"recurrent layer {name} ({rec['type']}): hidden size {rec['hidden']}"
                   + (f" ({rec['why']})" if rec.get("why") else "") + "; its input follows the layer before it")


def _dry_run(planned: tuple, as_json: bool) -> None:
    groups, record = planned
    if as_json:
        emit_json({"dry_run": True, "groups": groups, **record})
        return
    click.echo(f"{len(groups)} dependency groups (layers that lose the same channels together):")
    for i, g in enumerate(groups):
        click.echo(f"  [{i}] {g['channels']} channels, root {g['root']}: {', '.join(g['members'])}")
    click.echo("channel plan (before -> after):")
    for name, changes in record["channels"].items():
        click.echo(f"  {name:40} " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
    click.echo(f"params {_fmt(record['params_before'])} -> {_fmt(record['params_after'])}, "
               f"FLOPs {_fmt(record['flops_before'])} -> {_fmt(record['flops_after'])} "
               f"(ratio {record['ratio']}); dry run: nothing written")
    _print_recurrent(record)
