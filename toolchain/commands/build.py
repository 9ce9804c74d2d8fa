"""edgec demo | build | export | quantize."""
from __future__ import annotations

from pathlib import Path

import click

from edgec.commands.options import (FINITE, apply, check_options, data_options, emit_json, kd_options,
                                    model_options, output_options, quant_options, quant_options_from, _opset)

build_options = apply(
    click.option("--opset", type=int, default=17, show_default=True, callback=_opset, help="ONNX opset (17-20)."),
    click.option("--max-accuracy-drop", type=FINITE, default=1.0, show_default=True,
                 help="INT8 may lose at most this many points vs FP32: over it, the most sensitive nodes are kept in "
                      "FP32 (--fallback-seconds); still over it on the eval data, the build fails."),
    click.option("--fallback-seconds", type=FINITE, default=300.0, show_default=True,
                 help="Time box of the sensitivity fallback; 0 fails instead of keeping nodes in FP32."),
    click.option("--min-cosine", type=float, default=None,
                 help="Without labelled eval data: the fallback's budget is instead the INT8 outputs' mean cosine "
                      "to FP32 (e.g. 0.99), within --fallback-seconds, 90% of the weights staying INT8."),
    click.option("--ep", "providers", multiple=True, default=["cpu"], show_default=True,
                 help="Execution provider(s) to benchmark on: cpu, cuda, tensorrt, auto."),
    click.option("--bench-seconds", type=FINITE, default=2.0, show_default=True,
                 help="Benchmark time per model and provider; 0 skips the benchmark."),
    click.option("--prune", "prune_ratio", type=FINITE, help="Remove this fraction of channels (structured) first."),
    click.option("--distill", is_flag=True, help="Train the (pruned) model on the original's soft targets."),
    kd_options,
    check_options,
)


def _run_build(opts, as_json: bool, title: str):
    from edgec.pipeline import build
    from edgec.core.report import print_summary
    manifest = build(opts)
    if as_json:
        emit_json(manifest.to_json())
    else:
        print_summary(manifest, title)
        click.echo(f"package: {opts.output}  (edgec inspect {opts.output} | edgec verify {opts.output})")
    return manifest


def _build_options(model, arch, input_shape, trust_pickle, data, eval_data, image_size, mean, std, output, force,
                   calibration, samples, target, exclude_nodes, exclude_op_types, per_tensor, bias_correction, equalize,
                   opset, max_accuracy_drop, min_sqnr, tasks, label_output, fallback_seconds, min_cosine, providers,
                   bench_seconds, prune_ratio, distill, epochs, lr, alpha, temperature, extra=None):
    from edgec.core.errors import OptionError
    from edgec.exporters.metrics import parse_tasks
    from edgec.pipeline import BuildOptions
    prune_cfg = distill_cfg = None
    if prune_ratio is not None:
        from edgec.prune import PruneConfig
        prune_cfg = PruneConfig(ratio=prune_ratio)
    if distill:
        from edgec.train import TrainConfig
        distill_cfg = TrainConfig(epochs=epochs, alpha=alpha, temperature=temperature, lr=lr)
    elif prune_ratio is not None:
        click.echo("edgec: note: pruning without --distill loses accuracy; add --distill to recover it", err=True)
    if opset < 17:
        raise OptionError(f"--opset {opset}: edgec needs opset 17 or newer")
    return BuildOptions(
        model=model, output=output, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape, data=data,
        eval_data=eval_data, image_size=image_size, mean=mean, std=std, opset=opset,
        quant=quant_options_from(calibration, samples, target, exclude_nodes, exclude_op_types, per_tensor,
                                 bias_correction, equalize),
        max_accuracy_drop=max_accuracy_drop, min_sqnr=min_sqnr, tasks=parse_tasks(tasks), label_output=label_output,
        fallback_seconds=fallback_seconds, min_cosine=min_cosine, providers=tuple(providers),
        bench_seconds=bench_seconds,
        prune=prune_cfg, distill=distill_cfg, force=force, extra=extra or {})


@click.command("build")
@model_options
@data_options
@output_options
@quant_options
@build_options
@click.option("--sign-key", type=click.Path(dir_okay=False),
              help="Sign the package with this Ed25519 private key (NAME.key from `edgec keygen`) as it is written.")
def build_cmd(as_json, sign_key, **kw):
    """Turn a trained PyTorch model into a verified INT8 ONNX package (NAME.edgec/)."""
    opts = _build_options(**kw)
    opts.sign_key = sign_key
    _run_build(opts, as_json, f"edgec build: {kw['model']}")


@click.command("demo")
@click.option("-o", "--output", default="demo.edgec", show_default=True, type=click.Path())
@click.option("--retrain", is_flag=True, help="Train the demo model again instead of using the cached one.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def demo_cmd(output, retrain, as_json):
    """The built-in default end to end: ResNet18 trained on the embedded digits -> INT8 package."""
    from edgec.core.errors import OutputExists
    from edgec.demo import demo_model
    from edgec.core.package import read_manifest
    force = False
    if Path(output).exists():  # replace only an earlier demo package, never anything else
        try:
            force = bool(read_manifest(output).extra.get("demo"))
        except Exception:  # noqa: BLE001 - not a package at all: refuse below
            force = False
        if not force:
            raise OutputExists(f"{output} exists and is not an earlier demo package; pass -o elsewhere")
    model = demo_model(retrain=retrain)
    from edgec.pipeline import BuildOptions
    opts = BuildOptions(model=str(model), output=output, force=force, extra={"demo": True})  # every default
    _run_build(opts, as_json, "edgec demo: torchvision ResNet18 on builtin:digits, FP32 -> INT8")


@click.command("export")
@model_options
@data_options
@output_options
@click.option("--opset", type=int, default=17, show_default=True, callback=_opset, help="ONNX opset (17-20).")
def export_cmd(model, arch, input_shape, trust_pickle, data, eval_data, image_size, mean, std, output, force,
               as_json, opset):
    """Export a PyTorch model to ONNX, checked against torch on real samples."""
    from edgec.core.fsutil import atomic_path
    from edgec.pipeline import load_inputs, plain, stage_export
    inputs = load_inputs(model, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape, data=data,
                         eval_data=eval_data, image_size=image_size, mean=mean, std=std)
    with atomic_path(output, force=force, inputs=(model, data, eval_data)) as tmp:
        stage = stage_export(inputs.model.module, inputs, tmp, opset)
    _print_stage(stage, as_json, output)


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@output_options
@quant_options
def quantize_cmd(model, data, eval_data, image_size, mean, std, output, force, as_json, calibration, samples,
                 target, exclude_nodes, exclude_op_types, per_tensor, bias_correction, equalize):
    """Static INT8 quantization of an ONNX model with ONNX Runtime calibration on --data."""
    from edgec.data import load_data
    import numpy as np
    from edgec.exporters.compare import accuracy, compare_outputs, onnx_inputs
    from edgec.exporters.quantize import quantize_int8
    from edgec.core.fsutil import atomic_path
    from edgec.pipeline import agreement, plain
    from edgec.pipeline import check_calibration_size
    from edgec.exporters.onnx_export import check_onnx_file
    check_onnx_file(model)
    opts = quant_options_from(calibration, samples, target, exclude_nodes, exclude_op_types, per_tensor,
                              bias_correction, equalize)
    specs = onnx_inputs(model)
    calib = load_data(data, image_size=image_size, mean=mean, std=std).bind(specs)
    check_calibration_size(calib)
    with atomic_path(output, force=force, inputs=(model, data, eval_data)) as tmp:
        info = plain(quantize_int8(model, tmp, calib, opts))
        check = load_data(eval_data, image_size=image_size, mean=mean, std=std).bind(specs) if eval_data else calib
        x = check.take(np.arange(min(512, len(check))))   # streamed
        info["agreement"] = agreement(compare_outputs(model, tmp, x))
        if check.labelled:
            info["fp32_accuracy"] = 100 * accuracy(model, x, x.y)
            info["int8_accuracy"] = 100 * accuracy(tmp, x, x.y)
    if as_json:
        emit_json(info)
    else:
        _print_dict("quantize", info)
        click.echo(f"wrote {output}")


def _print_stage(stage, as_json, output):
    if as_json:
        emit_json(stage.to_dict())
    else:
        _print_dict(stage.name, stage.to_dict()["metrics"])
        click.echo(f"wrote {output}")


def _print_dict(title, d, indent=0):
    """Nested metrics as indented key: value lines (a readable view of the JSON)."""
    if indent == 0:
        click.echo(f"{title}:")
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{'  ' * (indent + 1)}{k}:")
            _print_dict(title, v, indent + 1)
        else:
            click.echo(f"{'  ' * (indent + 1)}{k}: {v}")
