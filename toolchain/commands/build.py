"""edgec demo | build | export | quantize: parse, one library call, render."""
from __future__ import annotations

from pathlib import Path

import click

from edgec.commands import options as o
from edgec.commands.options import emit_json, json_option


def build_options(kw: dict, **fixed):
    """BuildOptions from build's flags (distillation only with --distill; it trains on the labels of build's own
    --label-output)."""
    if kw["kd_loss"] and not kw["distill"]:
        from edgec.core.errors import OptionError
        raise OptionError("--kd-loss sets the distillation loss: add --distill (and --prune to distill a smaller "
                          "model)")
    kd = with_label_output(o.KD.make(kw), kw["label_output"])
    return o.BUILD.make(kw, source=o.SOURCE.make(kw), quant=o.QUANT.make(kw),
                        distill=kd if kw["distill"] else None, **fixed)


def with_label_output(train, label_output):
    """The distillation config trained on the labels of the gate's --label-output (none: it names no output)."""
    import dataclasses
    return dataclasses.replace(train, label_output=None if label_output in (None, "none") else label_output)


def _render_build(manifest, output, as_json: bool, title: str) -> None:
    from edgec.core.report import print_summary
    if as_json:
        emit_json(manifest.to_json())
    else:
        print_summary(manifest, title)
        if manifest.quantization.sensitivity is not None:
            from edgec.core.report import fallback_summary
            click.echo(fallback_summary(manifest.quantization.sensitivity))
        click.echo(f"package: {output}  (edgec inspect {output} | edgec verify {output})")


@click.command("build")
@o.SOURCE
@o.BUILD
@o.QUANT
@o.KD
@json_option
def build_cmd(as_json, **kw):
    """Turn a trained PyTorch model into a verified INT8 ONNX package (NAME.edgec/)."""
    from edgec.pipeline import build
    opts = build_options(kw)
    _render_build(build(opts), opts.output, as_json, f"edgec build: {opts.source.model}")


@click.command("demo")
@click.option("-o", "--output", default="demo.edgec", show_default=True, type=click.Path())
@click.option("--retrain", is_flag=True, help="Train the demo model again instead of using the cached one.")
@json_option
def demo_cmd(output, retrain, as_json):
    """The built-in default end to end: ResNet18 trained on the embedded digits -> INT8 package."""
    from edgec.core.errors import OutputExists
    from edgec.demo import demo_model
    from edgec.core.package import read_manifest
    from edgec.pipeline import BuildOptions, build
    from edgec.source import SourceSpec
    force = False
    if Path(output).exists():  # replace only an earlier demo package, never anything else
        try:
            force = bool(read_manifest(output).extra.get("demo"))
        except Exception:  # noqa: BLE001 - not a package at all: refuse below
            force = False
        if not force:
            raise OutputExists(f"{output} exists and is not an earlier demo package; pass -o elsewhere")
    model = demo_model(retrain=retrain)
    opts = BuildOptions(SourceSpec(str(model)), output, force=force, extra={"demo": True})  # every default
    _render_build(build(opts), output, as_json, "edgec demo: torchvision ResNet18 on builtin:digits, FP32 -> INT8")


@click.command("export")
@o.SOURCE
@o.BUILD.only("output", "force", "opset")
@json_option
def export_cmd(as_json, **kw):
    """Export a PyTorch model to ONNX, checked against torch on real samples (or, for a model file that records
    its input shape and no --data, on random inputs of that shape)."""
    from edgec.pipeline import export_model
    spec = o.SOURCE.make(kw)
    summary = export_model(spec, **kw)
    if as_json:
        emit_json(summary)
        return
    check, inp = summary["check"], summary["input"]
    click.echo(f"exported {spec.model} -> {summary['output']} ({summary['bytes'] / 1e6:.2f} MB, opset "
               f"{summary['opset']}, {summary['exporter']} exporter, {summary['seconds']:.1f}s)")
    click.echo(f"  input  {inp['name']} {inp['shape']} {inp['dtype']}")
    for out in summary["outputs"]:
        click.echo(f"  output {out['name']} {out['shape']} {out['dtype']}")
    click.echo(f"  matches torch on {check['samples']} samples of {check['data']}: max abs error "
               f"{check['max_abs_err']:.2g}, min cosine {check['min_cosine']:.6f}")
    for w in summary["warnings"]:
        click.echo(f"  warning: {w}")


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@o.SOURCE.only("data", "eval_data", "image_size", "mean", "std")
@o.BUILD.only("output", "force", "tasks", "label_output", "min_sqnr", "fallback_seconds", "min_cosine",
              min_cosine=o.Flag(("--min-cosine",), "Without labels in --data: keep the most sensitive nodes in FP32 "
                                "until every INT8 output's mean cosine to FP32 on calibration samples (those past "
                                "--samples where the data has them) reaches this "
                                "(and its SQNR --min-sqnr), within --fallback-seconds, 90% of the weights staying "
                                "INT8; 0 turns it off.", click={"type": o.FINITE}))
@o.QUANT
@json_option
def quantize_cmd(model, as_json, **kw):
    """Static INT8 quantization of an ONNX model with ONNX Runtime calibration on --data; every output checked
    against FP32 (not gated: `edgec build` gates)."""
    from edgec.exporters.metrics import DEFAULT_MIN_SQNR, CheckOptions
    from edgec.pipeline import quantize_model
    spec = o.SOURCE.only("data", "eval_data", "image_size", "mean", "std").make(kw, model=model)
    min_sqnr = kw.pop("min_sqnr")
    checks = CheckOptions(o.BUILD.flags["tasks"].convert(kw.pop("tasks")), kw.pop("label_output"),
                          DEFAULT_MIN_SQNR if min_sqnr is None else min_sqnr)
    s = quantize_model(model, spec, kw.pop("output"), o.QUANT.make(kw), force=kw.pop("force"), checks=checks,
                       fallback_seconds=kw.pop("fallback_seconds"), min_cosine=kw.pop("min_cosine"))
    if as_json:
        emit_json(s)
        return
    click.echo(f"quantized {model} -> {s['output']}: {s['fp32_bytes'] / 1e6:.2f} MB -> {s['bytes'] / 1e6:.2f} MB "
               f"({s['fp32_bytes'] / s['bytes']:.2f}x smaller), {s['method']} calibration on {s['samples']} samples, "
               f"{100 * (s['int8_weight_share'] or 0):.1f}% of weights INT8, {len(s['excluded_nodes'])} node(s) FP32")
    if s["fallback"]:
        from edgec.core.package import Sensitivity
        from edgec.core.report import fallback_summary
        click.echo("  " + fallback_summary(Sensitivity.from_json(s["fallback"])))
    for out in s["outputs"]:
        sqnr = "identical" if out["identical"] else f"SQNR {out['sqnr_db']} dB"
        figure = (f", {out['metric']} FP32 {out['fp32']:.2f} INT8 {out['int8']:.2f}" if out.get("metric") else "")
        from edgec.exporters.metrics import worst_part_text
        click.echo(f"  output {out['name']} ({out['task']}) on {s['eval_samples']} samples of {s['eval_data']}: "
                   f"{sqnr}{worst_part_text(out)}{figure}")
