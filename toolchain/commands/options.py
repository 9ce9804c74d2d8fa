"""Option groups shared by several commands, so each flag means the same everywhere."""
from __future__ import annotations

import click


class FiniteFloat(click.ParamType):
    """A float that is a number: nan and inf are refused where the option is declared (nan compares false
    with every bound, so `--lr nan` trained an all-NaN model and `--max-accuracy-drop nan` disabled the gate)."""
    name = "float"

    def convert(self, value, param, ctx):
        import math
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def _floats(ctx, param, value):
    import math
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like 0.485,0.456,0.406")
    return numbers


def _opset(ctx, param, value):
    """What the exporters write: 17 (edgec's floor) up to the TorchScript exporter's newest."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest
    if value is not None and not 17 <= value <= newest:
        raise click.BadParameter(f"{value}: edgec exports ONNX opset 17 to {newest}")
    return value


def _shape(ctx, param, value):
    from edgec.core.errors import OptionError
    from edgec.pipeline import parse_shape
    try:
        return parse_shape(value)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None


def apply(*decorators):
    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return wrap


model_options = apply(
    click.argument("model", type=click.Path(dir_okay=False)),
    click.option("--arch", help="Architecture for a checkpoint/state_dict: torchvision:NAME[?k=v], file.py:factory "
                                "or package.module:factory. The last two IMPORT (run) that file or module and "
                                "call the factory: name only code you trust. An edgec model file carries its "
                                "own spec; one from outside torchvision/edgec builds only if you repeat it here."),
    click.option("--input-shape", multiple=True, callback=_shape,
                 help="Input shape, e.g. 1,3,224,224; for a model with several inputs NAME=DIMS, repeatable. A name "
                      "instead of a number marks a dynamic axis, `batch` the batch axis: state=2,batch,128, "
                      "ids=batch,seq (default: from the model and the data)."),
    click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled nn.Module (runs code from the "
                                                      "file: only for files you trust)."),
)

data_options = apply(
    click.option("--data", default="builtin:digits", show_default=True,
                 help="Calibration/training data: builtin:digits, a .npz (one array per input name, or x for a "
                      "single-input model; optional y labels), an image folder, or file.py:function (a data hook: "
                      "edgec IMPORTS and RUNS that file; it returns dict batches {input_name: array})."),
    click.option("--eval-data", help="Labelled held-out data (default: builtin:digits:test for the built-in data, "
                                     "else 20%% of --data when labelled)."),
    click.option("--image-size", type=click.IntRange(1, 4096),
                 help="Image folders: resize+crop to this size (default 224)."),
    click.option("--mean", callback=_floats, help="Per-channel mean to subtract, e.g. 0.485,0.456,0.406."),
    click.option("--std", callback=_floats, help="Per-channel std to divide by, e.g. 0.229,0.224,0.225."),
)

output_options = apply(
    click.option("-o", "--output", required=True, type=click.Path(), help="Output path."),
    click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete)."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (nothing else there)."),
)

# knowledge distillation: the same flags, defaults and meaning in build, compare and distill
kd_options = apply(
    click.option("--epochs", type=int, default=10, show_default=True, help="Distillation epochs."),
    click.option("--lr", type=FINITE, default=0.01, show_default=True,
                 help="Peak learning rate of distillation (one-cycle cosine)."),
    click.option("--alpha", type=FINITE, default=0.5, show_default=True,
                 help="Weight of the teacher's soft targets (0 = plain fine-tuning on labels)."),
    click.option("--temperature", type=FINITE, default=2.0, show_default=True, help="Distillation temperature."),
)

# what INT8 is checked on, per output (edgec.exporters.metrics): the same flags wherever models are gated
check_options = apply(
    click.option("--min-sqnr", type=FINITE, default=None,
                 help="Every output's SQNR of INT8 vs FP32 over the eval data must reach this many dB "
                      "(default 15: properly calibrated INT8 measured 26-44 dB, wrong calibration ranges 0-23)."),
    click.option("--task", "tasks", multiple=True, metavar="OUTPUT=TASK",
                 help="What an output is, so it gets its task's check: classify, multilabel, regress, score, "
                      "embed, none (repeatable; a one-output model may say --task classify). Default: detected "
                      "and printed."),
    click.option("--label-output", help="The output the labels of --data/--eval-data apply to (needed when the "
                                        "model has several outputs; 'none' ignores the labels)."),
)

quant_options = apply(
    click.option("--calibration", type=click.Choice(["minmax", "entropy", "percentile", "auto", "mse"]), default=None,
                 help="Calibration method (default: the quantizer's recommended one)."),
    click.option("--samples", type=int, default=None, help="Calibration samples (default 256, or all if fewer)."),
    click.option("--target", default=None, help="Device to quantize for: host, cpu-avx2, cpu-vnni, cpu-arm64, cuda, "
                                                "tensorrt (default: this machine)."),
    click.option("--exclude-node", "exclude_nodes", multiple=True, help="Node name to keep in FP32 (repeatable)."),
    click.option("--exclude-op-type", "exclude_op_types", multiple=True,
                 help="Operator type to keep in FP32, e.g. Gemm (repeatable)."),
    click.option("--per-tensor", is_flag=True, help="Per-tensor instead of per-channel weight scales."),
    click.option("--bias-correction/--no-bias-correction", default=None,
                 help="Correct each quantized layer's mean output shift (default: on for models with depthwise "
                      "convs)."),
    click.option("--equalize/--no-equalize", default=None,
                 help="Cross-layer equalization before quantization (default: off; it did not help when measured)."),
)


def quant_options_from(calibration, samples, target, exclude_nodes, exclude_op_types, per_tensor,
                       bias_correction=None, equalize=None):
    """CLI flags -> the quantizer's typed options (only what the user set; the rest are its defaults)."""
    from edgec.exporters.quantize import QuantOptions
    kw = {"exclude_nodes": tuple(exclude_nodes), "exclude_op_types": tuple(exclude_op_types),
          "per_channel": not per_tensor, "bias_correction": bias_correction, "equalize": equalize}
    if calibration:
        kw["method"] = calibration
    if samples:
        kw["num_samples"] = samples
    if target:
        kw["target"] = target
    return QuantOptions(**kw)


def emit_json(obj) -> None:
    import json
    click.echo(json.dumps(obj, indent=2))
