"""Command-line options, each declared once: a `Group` maps some fields of an options dataclass to flags with
their help; the default comes from the dataclass (or, where the CLI means another one, from the Flag), the
validation from the dataclass's validate(). A command applies groups, then makes its options with
`Group.make(kwargs)`: parse, one library call, render.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import click

_FROM_CLASS = object()


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
    from edgec.inputspec import parse_input_shapes
    try:
        return parse_input_shapes(value)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None


def _size(ctx, param, value):
    if value is None:
        return None
    from edgec.core.errors import OptionError
    from edgec.runtime.gate import parse_size_mb
    try:
        return int(parse_size_mb(value) * 1e6)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None


def _hint(ctx, param, values):
    out = []
    for v in values:
        s, _, t = v.partition(":")
        if not s:
            raise click.BadParameter(f"{v!r}: expected STUDENT_LAYER[:TEACHER_LAYER], e.g. layer3:layer3")
        out.append((s, t or s))
    return tuple(out)


@dataclass(frozen=True)
class Flag:
    decls: tuple                       # ("--calibration",), ("-o", "--output"); ("MODEL",) for an argument
    help: str = ""
    default: object = _FROM_CLASS      # the dataclass field's default unless the CLI means another one
    convert: Callable | None = None    # parsed value -> field value
    click: dict = field(default_factory=dict)   # type, multiple, is_flag, callback, metavar, required


class Group:
    """Flags for fields of `cls`; applied as a decorator, made into `cls` from the parsed keyword arguments."""

    def __init__(self, cls, flags: dict[str, Flag]):
        self.cls, self.flags = cls, flags
        self.fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(flags) - set(self.fields)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")

    def only(self, *names, **replaced: Flag) -> "Group":
        """The same flags for a subset of the fields (optionally with some replaced)."""
        return Group(self.cls, {n: replaced.get(n, self.flags[n]) for n in names})

    def default(self, name: str):
        flag, f = self.flags[name], self.fields[name]
        if flag.default is not _FROM_CLASS:
            return flag.default
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None

    def _param(self, name: str, flag: Flag):
        kw = dict(flag.click)
        if flag.decls[0].isupper():  # positional
            return click.argument(name, metavar=flag.decls[0], **kw)
        default = self.default(name)
        if default is None and "/" in flag.decls[0]:  # --x/--no-x left unset stays None ("auto"), not False
            kw.setdefault("default", None)
        if default is not None and not (isinstance(default, (tuple, list, dict)) and not default):
            kw.setdefault("default", default)
            if default is not False:
                kw.setdefault("show_default", True)
        return click.option(*flag.decls, name, help=flag.help, **kw)

    def __call__(self, f):
        for name in reversed(list(self.flags)):
            f = self._param(name, self.flags[name])(f)
        return f

    def values(self, kw: dict) -> dict:
        """Take this group's values out of a command's keyword arguments."""
        out = {}
        for name, flag in self.flags.items():
            value = kw.pop(name)
            out[name] = flag.convert(value) if flag.convert is not None else value
        return out

    def make(self, kw: dict, **fixed):
        obj = self.cls(**{**self.values(kw), **fixed})
        if hasattr(obj, "validate"):
            obj.validate()
        return obj


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (nothing else there).")


def emit_json(obj) -> None:
    import json
    click.echo(json.dumps(obj, indent=2))


def _tuple(v):
    return tuple(v) if v is not None else None


# ---------------------------------------------------------------- the groups

def _source_group() -> Group:
    from edgec.source import SourceSpec
    return Group(SourceSpec, {
        "model": Flag(("MODEL",), click={"type": click.Path(dir_okay=False)}),
        "arch": Flag(("--arch",), "Architecture for a checkpoint/state_dict: torchvision:NAME[?k=v], file.py:factory "
                                  "or package.module:factory. The last two IMPORT (run) that file or module and "
                                  "call the factory: name only code you trust. An edgec model file carries its "
                                  "own spec; one from outside torchvision/edgec builds only if you repeat it here."),
        "input_shape": Flag(("--input-shape",), "Input shape, e.g. 1,3,224,224; for a model with several inputs "
                            "NAME=DIMS, repeatable. A name instead of a number marks a dynamic axis, `batch` the batch "
                            "axis: state=2,batch,128, ids=batch,seq (default: from the model and the data).",
                            click={"multiple": True, "callback": _shape}),
        "trust_pickle": Flag(("--trust-pickle",), "Allow loading a fully pickled nn.Module (runs code from the "
                                                  "file: only for files you trust).", click={"is_flag": True}),
        "data": Flag(("--data",), "Calibration/training data: builtin:digits (the default), a .npz (one array per "
                                  "input name, or x for a single-input model; optional y labels), an image folder, or "
                                  "file.py:function (a data hook: edgec IMPORTS and RUNS that file; it returns dict "
                                  "batches {input_name: array})."),
        "eval_data": Flag(("--eval-data",), "Labelled held-out data (default: builtin:digits:test for the built-in "
                                            "data, else 20% of --data when labelled)."),
        "image_size": Flag(("--image-size",), "Image folders: resize+crop to this size (default: the model file's "
                                              "recorded input size, else 224).", click={"type": click.IntRange(1, 4096)}),
        "mean": Flag(("--mean",), "Per-channel mean to subtract, e.g. 0.485,0.456,0.406.", click={"callback": _floats}),
        "std": Flag(("--std",), "Per-channel std to divide by, e.g. 0.229,0.224,0.225.", click={"callback": _floats}),
    })


def _quant_group() -> Group:
    from edgec.exporters.quantize import QuantOptions
    return Group(QuantOptions, {
        "method": Flag(("--calibration",), "Calibration method.",
                       click={"type": click.Choice(["minmax", "entropy", "percentile", "auto", "mse"])}),
        "num_samples": Flag(("--samples",), "Calibration samples (all if fewer).", click={"type": int}),
        "target": Flag(("--target",), "Device to quantize for: host, cpu-avx2, cpu-vnni, cpu-arm64, cuda, tensorrt "
                                      "(default: this machine)."),
        "exclude_nodes": Flag(("--exclude-node",), "Node name to keep in FP32 (repeatable).", convert=tuple,
                              click={"multiple": True}),
        "exclude_op_types": Flag(("--exclude-op-type",), "Operator type to keep in FP32, e.g. Gemm (repeatable).",
                                 convert=tuple, click={"multiple": True}),
        "per_channel": Flag(("--per-channel/--per-tensor",), "Per-channel or per-tensor weight scales."),
        "bias_correction": Flag(("--bias-correction/--no-bias-correction",),
                                "Correct each quantized layer's mean output shift (default: on for models with "
                                "depthwise convs)."),
        "equalize": Flag(("--equalize/--no-equalize",),
                         "Cross-layer equalization before quantization (default: off; it did not help when measured)."),
    })


def _train_group() -> Group:
    from edgec.stages import KD_LR
    from edgec.train import TrainConfig
    return Group(TrainConfig, {
        "epochs": Flag(("--epochs",), "Distillation epochs.", click={"type": int}),
        "lr": Flag(("--lr",), "Peak learning rate of distillation (one-cycle cosine).", default=KD_LR,
                   click={"type": FINITE}),
        "alpha": Flag(("--alpha",), "Weight of the teacher's soft targets (0 = plain fine-tuning on labels).",
                      click={"type": FINITE}),
        "temperature": Flag(("--temperature",), "Distillation temperature.", click={"type": FINITE}),
        "batch_size": Flag(("--batch-size",), "Per process.", click={"type": int}),
        "optimizer": Flag(("--optimizer",), "", click={"type": click.Choice(["sgd", "adamw"])}),
        "weight_decay": Flag(("--weight-decay",), "", click={"type": FINITE}),
        "schedule": Flag(("--schedule",), "", click={"type": click.Choice(["cosine", "constant"])}),
        "hints": Flag(("--hint",), "Feature loss STUDENT_LAYER[:TEACHER_LAYER] (repeatable), e.g. layer3.",
                      click={"multiple": True, "callback": _hint}),
        "hint_weight": Flag(("--hint-weight",), "", click={"type": FINITE}),
        "augment": Flag(("--augment/--no-augment",), "Random translation of training images (default: only image "
                        "inputs are ever translated)."),
        "kd_loss": Flag(("--kd-loss",), "Loss of one output and its weight: kl (logits), bce (probabilities), mse "
                        "(regression), cosine (embeddings), auto (the detected one), e.g. 0=bce, output_1=mse:0.5 or "
                        "boxes=auto:2 (repeatable; default: chosen from the teacher's outputs, weight 1). An output's "
                        "labels (y on --label-output, y:OUTPUT) add to its term.", convert=_kd_loss,
                        click={"multiple": True, "metavar": "OUTPUT=KIND[:WEIGHT]"}),
        "label_output": Flag(("--label-output",), "The output the labels belong to (position or name; default: the "
                             "first)."),
        "batchnorm": Flag(("--batchnorm",), "BatchNorm while training: train (batch statistics), frozen (fixed "
                          "running statistics, as in eval) or auto (frozen only where momentum 0 never updates them).",
                          click={"type": click.Choice(["auto", "train", "frozen"])}),
        "patience": Flag(("--patience",), "Stop after this many epochs without a better eval accuracy.",
                         click={"type": int}),
        "seed": Flag(("--seed",), "", click={"type": int}),
        "device": Flag(("--device",), "", click={"type": click.Choice(["auto", "cpu", "cuda"])}),
        "resume": Flag(("--resume",), "Continue an interrupted run from OUTPUT.ckpt.", click={"is_flag": True}),
    })


def _prune_group() -> Group:
    from edgec.prune import IMPORTANCE, PruneConfig
    return Group(PruneConfig, {
        "ratio": Flag(("--ratio",), "Fraction of channels to remove, in (0, 1), e.g. 0.5.", click={"type": FINITE}),
        "target_flops": Flag(("--target-flops",), "Instead of --ratio: keep this fraction of the FLOPs, e.g. 0.25.",
                             click={"type": FINITE}),
        "target_params": Flag(("--target-params",), "Instead of --ratio: keep this fraction of the parameters.",
                              click={"type": FINITE}),
        "importance": Flag(("--importance",), "Channel ranking: weight magnitude, BatchNorm scale, or first-order "
                                              "Taylor (needs --data).", click={"type": click.Choice(IMPORTANCE)}),
        "global_pruning": Flag(("--global",), "Rank channels across layers (uneven widths).", click={"is_flag": True}),
        "steps": Flag(("--steps",), "Iterative pruning steps.", click={"type": int}),
        "round_to": Flag(("--round-to",), "Keep channel counts a multiple of this, e.g. 8.", click={"type": int}),
        "ignore": Flag(("--ignore",), "Layer name to leave unpruned, with its children (repeatable).", convert=tuple,
                       click={"multiple": True}),
    })


def _kd_loss(values):
    from edgec.kdloss import parse
    return [list(t) for t in parse(values)]   # travels to DDP workers as JSON


def _tasks(values):
    from edgec.exporters.metrics import parse_tasks
    return parse_tasks(values)


def _prune_ratio(ratio):
    if ratio is None:
        return None
    from edgec.prune import PruneConfig
    return PruneConfig(ratio=ratio)


def _check_flags() -> dict:
    """What every output is checked on (--min-sqnr, --task, --label-output): declared once, for build and compare."""
    return {
        "min_sqnr": Flag(("--min-sqnr",), "Every output's SQNR of INT8 vs FP32 over the eval data must reach this "
                         "many dB (default 15: properly calibrated INT8 measured 26-44 dB, wrong calibration ranges "
                         "0-23).",
                         click={"type": FINITE}),
        "tasks": Flag(("--task",), "What an output is, so it gets its task's check: classify, multilabel, regress, "
                      "score, embed, none (repeatable; a one-output model may say --task classify). Default: detected "
                      "and printed.", convert=_tasks, click={"multiple": True, "metavar": "OUTPUT=TASK"}),
        "label_output": Flag(("--label-output",), "The output the labels of --data/--eval-data apply to (needed when "
                             "the model has several outputs; 'none' ignores the labels)."),
    }


def _build_group() -> Group:
    from edgec.pipeline import BuildOptions
    return Group(BuildOptions, {
        "output": Flag(("-o", "--output"), "Output path.", click={"required": True, "type": click.Path()}),
        "force": Flag(("--force",), "Replace an existing output (only once the new one is complete).",
                      click={"is_flag": True}),
        "opset": Flag(("--opset",), "ONNX opset (17-20).", click={"type": int, "callback": _opset}),
        "max_accuracy_drop": Flag(("--max-accuracy-drop",), "INT8 may lose at most this many points vs FP32: over "
                                  "it, the most sensitive nodes are kept in FP32 (--fallback-seconds); still over it "
                                  "on the eval data, the build fails.", click={"type": FINITE}),
        **_check_flags(),
        "fallback_seconds": Flag(("--fallback-seconds",), "Time box of the sensitivity fallback (it keeps the "
                                 "most sensitive nodes in FP32 when over budget); 0 turns it off.",
                                 click={"type": FINITE}),
        "min_cosine": Flag(("--min-cosine",), "Without labels in --data: the fallback's budget, every INT8 output's "
                           "mean cosine to FP32 on calibration samples (those past --samples where the data has "
                           "them; the agreement figures staying within "
                           "--max-accuracy-drop), within --fallback-seconds, 90% of the weights staying INT8; 0 "
                           "turns the cosine budget off.", click={"type": FINITE}),
        "providers": Flag(("--ep",), "Execution provider(s) to benchmark on: cpu, cuda, tensorrt, auto.",
                          convert=tuple, click={"multiple": True}),
        "bench_seconds": Flag(("--bench-seconds",), "Benchmark time per model and provider; 0 skips the benchmark.",
                              click={"type": FINITE}),
        "prune": Flag(("--prune",), "Remove this fraction of channels (structured) first.", convert=_prune_ratio,
                      click={"type": FINITE}),
        "distill": Flag(("--distill",), "Train the (pruned) model on the original's soft targets.",
                        default=False, click={"is_flag": True}),
        "sign_key": Flag(("--sign-key",), "Sign the package with this Ed25519 private key (NAME.key from `edgec "
                                          "keygen`) as it is written.", click={"type": click.Path(dir_okay=False)}),
    })


def _compare_group() -> Group:
    from edgec.compare import CALIBRATIONS, RECIPES, CompareOptions

    def recipes(text):
        return tuple(r.strip() for r in text.split(",") if r.strip())
    return Group(CompareOptions, {
        "output": Flag(("-o", "--output"), "Folder for the cache (reused by a rerun), report.md and plots.",
                       click={"required": True, "type": click.Path(file_okay=False)}),
        "recipes": Flag(("--recipes",), "Comma-separated subset of: " + ", ".join(RECIPES) + ".",
                        default=",".join(RECIPES), convert=recipes),
        "calibrations": Flag(("--calibration",), "Calibration method(s) for ptq-int8, one row each.",
                             convert=tuple, click={"multiple": True, "type": click.Choice(CALIBRATIONS)}),
        "providers": Flag(("--ep",), "Execution provider(s).", convert=tuple, click={"multiple": True}),
        "prune_ratio": Flag(("--prune-ratio",), "Fraction of channels prune-kd removes.", click={"type": FINITE}),
        "qat_epochs": Flag(("--qat-epochs",), "Quantization-aware fine-tuning epochs.", click={"type": int}),
        "bench_seconds": Flag(("--bench-seconds",), "Benchmark time per model.", click={"type": FINITE}),
        "fresh": Flag(("--fresh",), "Recompute every recipe instead of reusing the cache.", click={"is_flag": True}),
        "max_accuracy_drop": Flag(("--max-accuracy-drop",), "Constraint (and --package's gate, as in build): points "
                                  "a recipe may lose vs FP32 on any output's task figure (accuracy, F1, "
                                  "correlation, cosine, agreement).", click={"type": FINITE}),
        **_check_flags(),
        "budgets": Flag(("--budget",), "Constraint: latency on the first --ep, e.g. p90=10ms.",
                        convert=tuple, click={"multiple": True}),
        "max_size": Flag(("--max-size",), "Constraint: file size, e.g. 5MB.", click={"callback": _size}),
        "prefer": Flag(("--prefer",), "", click={"type": click.Choice(["latency", "size"])}),
        "package": Flag(("--package",), "Write the recommended INT8 recipe's measured model as a .edgec package.",
                        click={"type": click.Path()}),
        "force": Flag(("--force",), "With --package: replace an existing package.", click={"is_flag": True}),
    })


def _launch_group() -> Group:
    from edgec.distributed import Launch
    return Group(Launch, {
        "nproc_per_node": Flag(("--nproc-per-node",), "Processes (GPUs) on this machine; >1 launches DDP through "
                                                      "torch.distributed.run.", click={"type": int}),
        "nnodes": Flag(("--nnodes",), "Machines taking part.", click={"type": int}),
        "node_rank": Flag(("--node-rank",), "This machine's index.", click={"type": int}),
        "master_addr": Flag(("--master-addr",), "Host of node rank 0 (several machines)."),
        "master_port": Flag(("--master-port",), "Port on the master (default 29500; a free one on a single node).",
                            click={"type": int}),
    })


_GROUPS = {"SOURCE": _source_group, "QUANT": _quant_group, "TRAIN": _train_group,
           # distillation in build/compare (its --label-output is build's/compare's own, copied in by the command)
           "KD": lambda: _train_group().only("epochs", "lr", "alpha", "temperature", "kd_loss", "batchnorm"),
           "PRUNE": _prune_group, "BUILD": _build_group, "COMPARE": _compare_group, "LAUNCH": _launch_group}


def __getattr__(name: str) -> Group:
    """Groups are made on first use: their dataclasses live in modules that import torch, which `edgec inspect`
    (it only needs emit_json) should not pay for."""
    if name not in _GROUPS:
        raise AttributeError(name)
    group = globals()[name] = _GROUPS[name]()
    return group
