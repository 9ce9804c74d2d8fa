"""edgec prune: remove whole channels (structured pruning) and write a self-describing model file."""
from __future__ import annotations

import click

from edgec.commands.options import FINITE, _floats, emit_json, model_options


@click.command("prune")
@model_options
@click.option("--data", help="Samples for --importance taylor (and the input shape when the model has none).")
@click.option("--image-size", type=int, help="Image folders: resize+crop to this size.")
@click.option("--mean", callback=_floats, help="Per-channel mean to subtract.")
@click.option("--std", callback=_floats, help="Per-channel std to divide by.")
@click.option("--ratio", type=FINITE, help="Fraction of channels to remove, in (0, 1), e.g. 0.5.")
@click.option("--target-flops", type=FINITE, help="Instead of --ratio: keep this fraction of the FLOPs, e.g. 0.25.")
@click.option("--target-params", type=FINITE, help="Instead of --ratio: keep this fraction of the parameters.")
@click.option("--importance", type=click.Choice(["l1", "l2", "bn", "taylor"]), default="l2", show_default=True,
              help="Channel ranking: weight magnitude, BatchNorm scale, or first-order Taylor (needs --data).")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across layers (uneven widths).")
@click.option("--steps", type=int, default=1, show_default=True, help="Iterative pruning steps.")
@click.option("--round-to", type=int, help="Keep channel counts a multiple of this, e.g. 8.")
@click.option("--ignore", multiple=True, help="Layer name to leave unpruned, with its children (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the dependency groups and the channel plan; write nothing.")
@click.option("-o", "--output", type=click.Path(), help="Output model file (required unless --dry-run).")
@click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (nothing else there).")
def prune_cmd(model, arch, input_shape, trust_pickle, data, image_size, mean, std, ratio, target_flops,
              target_params, importance, global_pruning, steps, round_to, ignore, dry_run, output, force, as_json):
    """Remove channels from MODEL (dependency-aware) and save the smaller model to -o."""
    from edgec.core.errors import OptionError
    from edgec.core.fsutil import check_writable
    from edgec.prune import PruneConfig
    cfg = PruneConfig(ratio=ratio, target_flops=target_flops, target_params=target_params, importance=importance,
                      global_pruning=global_pruning, steps=steps, round_to=round_to, ignore=tuple(ignore))
    cfg.validate()
    if not dry_run:
        if not output:
            raise OptionError("-o/--output is required (or --dry-run to only print the plan)")
        check_writable(output, force, inputs=(model, data))  # fail before the work, not after
    loaded, dataset = _load(model, arch, input_shape, trust_pickle, data, image_size, mean, std)
    if dry_run:
        return _dry_run(loaded, cfg, dataset, as_json)
    from edgec.modelio import save_model
    from edgec.prune import prune_model
    pruned, record = prune_model(loaded, cfg, dataset)
    if loaded.arch is None:
        raise OptionError(f"{model} has no architecture spec to save with; pass --arch")
    save_model(output, pruned, loaded.arch, record["input_shape"], force=force,
               history=[*loaded.meta.get("history", []), {"stage": "prune", **record}],
               preprocess=loaded.meta.get("preprocess") or (dataset.preprocess if dataset else None))
    result = {"output": str(output), **{k: v for k, v in record.items() if k != "channels"},
              "layers_changed": len(record["channels"])}
    if as_json:
        emit_json(result | {"channels": record["channels"]})
    else:
        _print_record(result)


def _load(model, arch, input_shape, trust_pickle, data, image_size, mean, std):
    from edgec.data import load_data
    from edgec.modelio import load_model
    loaded = load_model(model, arch, trust_pickle=trust_pickle, input_shape=input_shape)
    dataset = None
    if data:
        dataset = load_data(data, image_size=image_size, mean=mean, std=std)
        dataset.validate(loaded.input_shape or (1, *dataset.sample_shape))
    return loaded, dataset


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
    click.echo(f"channel ratio {r['ratio']}, {r['layers_changed']} layers changed; FLOPs at batch 1, "
               f"input {r['input_shape']} (2 per multiply-add)")
    click.echo(f"wrote {r['output']}")


def _dry_run(loaded, cfg, dataset, as_json: bool) -> None:
    from edgec.prune import describe_groups, prune_model
    groups = describe_groups(loaded, cfg, dataset)
    _, record = prune_model(loaded, cfg, dataset)  # on a copy: the model file is not touched
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
