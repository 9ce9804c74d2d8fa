"""`edgec build`: model.pt -> (prune) -> (distill) -> ONNX FP32 -> INT8 -> accuracy check -> bench -> package.

Each stage is one function that takes the previous artifact and its options and returns the next
artifact plus a record (`Stage`); the manifest is the sum of those records. Everything is written into
a temporary folder that is renamed to NAME.edgec only when every stage has passed.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgec.data import Dataset, check_memory, load_data, split
from edgec.inputspec import (apply_overrides, declared_inputs, dynamic_from_data, example_args, legacy_shape,
                             parse_input_shapes)
from edgec.core.errors import BudgetExceeded, DataError, OptionError, cause_line
from edgec.core.fsutil import atomic_path
from edgec.metrics import count_flops, count_params
from edgec.modelio import LoadedModel, load_model
from edgec.core.progress import note

EVAL_FRACTION = 0.2      # held out of --data when no --eval-data is given
VALIDATION_FRACTION = 0.1  # held out of the training data to pick the best epoch (never the eval data)
EXPORT_CHECK_SAMPLES = 64
FALLBACK_SAMPLES = 512   # calibration samples that score sensitivity fallback candidates
MIN_CALIBRATION_SAMPLES = 32  # the calibration check's own minimum (exporters.calibration.check_samples)


def plain(obj):
    """Dataclasses, numpy scalars and paths -> JSON-ready values."""
    if dataclasses.is_dataclass(obj):
        return plain(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class Stage:
    """What a stage needs, what it gives, with which options, what it measured, how long it took."""
    name: str
    needs: str
    gives: str
    options: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return plain({"name": self.name, "needs": self.needs, "gives": self.gives, "options": self.options,
                      "metrics": self.metrics, "seconds": round(self.seconds, 3)})


class timed:
    def __init__(self, stage: Stage):
        self.stage = stage

    def __enter__(self):
        self.t0 = time.perf_counter()
        note(f"{self.stage.name}: {self.stage.gives}")
        return self.stage

    def __exit__(self, *exc):
        self.stage.seconds = time.perf_counter() - self.t0
        return False


# ---------------------------------------------------------------- inputs

@dataclass
class Inputs:
    model: LoadedModel
    input_shape: tuple | None   # a single-input model's shape at batch 1 (FLOPs, model files); None: several
    calib: Dataset
    eval: Dataset | None
    num_outputs: int
    specs: list = field(default_factory=list)   # edgec.core.feeds.InputSpec per model input, completed from data
    output_names: list = field(default_factory=list)   # as exported: what --task/--label-output name
    checks: object = None                               # edgec.exporters.metrics.CheckOptions

    def example(self) -> tuple:
        """Positional torch arguments of one real sample, in the model's input order."""
        return example_args(self.calib.head(1), self.specs)


def parse_shape(text) -> tuple | dict | None:
    """--input-shape (repeatable): `1,3,224,224` for a single-input model, or NAME=DIMS per input."""
    return parse_input_shapes(text)


def check_calibration_size(calib: Dataset, held_out: int = 0) -> None:
    """INT8 ranges from a handful of samples do not fit real inputs (and an accuracy on them means nothing)."""
    if len(calib) < MIN_CALIBRATION_SAMPLES:
        kept = f" after holding out {held_out} for evaluation (or pass --eval-data)" if held_out else ""
        raise DataError(f"{calib.source}: {len(calib)} calibration samples{kept}; edgec needs at least "
                        f"{MIN_CALIBRATION_SAMPLES} (256 by default), drawn from the data the model will see")


def load_inputs(model_path, *, arch=None, trust_pickle=False, input_shape=None, data="builtin:digits",
                eval_data=None, image_size=None, mean=None, std=None, checks=None) -> Inputs:
    """Load and validate model and data before any work starts."""
    from edgec.exporters.metrics import CheckOptions, check_names
    from edgec.exporters.onnx_export import default_output_names
    checks = checks if checks is not None else CheckOptions()
    checks.validate()
    one_shape = legacy_shape(input_shape) if isinstance(input_shape, tuple) else None
    loaded = load_model(model_path, arch, trust_pickle=trust_pickle, input_shape=one_shape)
    kw = dict(image_size=image_size, mean=mean, std=std)
    calib = load_data(data, **kw)
    specs = dynamic_from_data(calib.bind(apply_overrides(declared_inputs(loaded), input_shape)).specs, calib)
    calib.specs = specs
    shape = (loaded.input_shape or legacy_shape(specs[0].shape)) if len(specs) == 1 else None
    if eval_data:
        evaluation = load_data(eval_data, **kw)
    elif calib.source == "builtin:digits:train":
        evaluation = load_data("builtin:digits:test")
    elif calib.labelled and len(calib) >= 10:
        calib, evaluation = split(calib, EVAL_FRACTION)
        note(f"no --eval-data: holding out {len(evaluation)} of {calib.source}'s samples for evaluation")
    else:
        evaluation = None
    held_out = len(evaluation) if evaluation is not None and evaluation.source == calib.source and not eval_data else 0
    check_calibration_size(calib, held_out=held_out)
    example = example_args(calib.head(1), specs)
    try:
        with torch.no_grad():
            out = out_all = loaded.module(*example)
    except Exception as e:  # noqa: BLE001 - any failure here means data and model do not fit
        shapes = ", ".join(f"{s.name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           for s, t in zip(specs, example))
        raise DataError(f"the model fails on a sample ({shapes}) from {calib.source} "
                        f"({cause_line(e)}); check --input-shape/--image-size") from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    num_outputs = int(out.shape[-1]) if out.ndim else 1
    outs = out_all if isinstance(out_all, (tuple, list)) else (out_all,)
    names = default_output_names(len(outs))
    # --task/--label-output name real outputs, and labels apply to a named one: checked before any long work
    label_output = check_names(names, checks, (evaluation if evaluation is not None else calib).labelled)
    if evaluation is not None:
        given = checks.tasks.get(label_output, checks.tasks.get("")) if label_output else None
        labelled_out = outs[names.index(label_output)] if given == "classify" else None
        evaluation.bind(specs, num_classes=int(labelled_out.shape[-1]) if labelled_out is not None else None)
    params = [*loaded.module.parameters(), *loaded.module.buffers()]
    check_memory(sum(t.numel() * t.element_size() for t in params),
                 sum(o.numel() * o.element_size() for o in outs), calib, evaluation)
    return Inputs(loaded, shape, calib, evaluation, num_outputs, specs, names, checks)


def num_classes(data: Dataset) -> int | None:
    """The data's class count where the data says it (class folders, built-in data), for task detection."""
    return len(data.classes) if data.classes else None


# ---------------------------------------------------------------- stages

def stage_load(inputs: Inputs) -> Stage:
    m = inputs.model
    return Stage("load", "model file + data", "eager/TorchScript module, validated data",
                 options=m.describe(),
                 metrics={"params": count_params(m.module), "flops": count_flops(m.module, inputs.example()),
                          "calib": inputs.calib.describe(),
                          "eval": inputs.eval.describe() if inputs.eval is not None else None})


def stage_export(module, inputs: Inputs, path: Path, opset: int) -> Stage:
    from edgec.exporters.onnx_export import check_onnx_against_torch, export_onnx
    stage = Stage("export", "torch module + example input", "model.fp32.onnx checked against torch",
                  options={"opset": opset, "dynamic_axes": {s.name: s.dynamic_axes for s in inputs.specs}})
    with timed(stage):
        info = export_onnx(module, inputs.calib.head(1), path, opset=opset, inputs=inputs.specs)
        check_data = inputs.eval if inputs.eval is not None else inputs.calib
        check = check_onnx_against_torch(module, path, check_data.head(EXPORT_CHECK_SAMPLES))
        stage.metrics = {"export": plain(info), "check": check}
    return stage


def stage_quantize(fp32: Path, int8: Path, inputs: Inputs, options, max_drop: float | None = None,
                   fallback_seconds: float = 0.0, min_cosine: float | None = None) -> Stage:
    """Static INT8; with a drop budget and a time box, the most sensitive nodes fall back to FP32 until the
    drop on calibration samples fits (never on the eval data, which stays for the honest check after).
    The drop is the gate's own: the checked outputs' task figures, with labels or against FP32 without; with
    min_cosine and no labels, the mean cosine of every output to FP32 (edgec.exporters.sensitivity.cosine_score)."""
    from edgec.exporters.quantize import quantize_int8
    fallback = max_drop is not None and fallback_seconds > 0
    labelled = inputs.eval is not None and inputs.eval.labelled
    stage = Stage("quantize", "model.fp32.onnx + calibration data (no labels needed)",
                  "model.onnx: static INT8 (QDQ), ONNX Runtime calibration"
                  + ("; sensitive nodes kept in FP32 when over the budget" if fallback else ""),
                  options={**plain(options), "fallback": {"max_accuracy_drop": max_drop,
                                                          "min_cosine": None if labelled else min_cosine,
                                                          "time_budget_s": fallback_seconds} if fallback else None})
    with timed(stage):
        if fallback:
            from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
            n = len(inputs.calib)  # spread over the data: folders are sorted by class
            scored = inputs.calib.take(np.unique(np.linspace(0, n - 1, min(n, FALLBACK_SAMPLES)).astype(int)))
            # re-read per candidate where that is cheap (memory-mapped arrays), else decoded once and kept
            x = scored if scored.rereadable else scored.head(len(scored))
            info, _ = quantize_with_budget(fp32, int8, inputs.calib, x, scored.y, options,
                                           FallbackOptions(max_accuracy_drop=max_drop, time_budget_s=fallback_seconds,
                                                           checks=inputs.checks, num_classes=num_classes(scored),
                                                           min_cosine=None if labelled else min_cosine))
        else:
            info = quantize_int8(fp32, int8, inputs.calib, options)
        stage.metrics = plain(info)
    return stage


def agreement(compared: dict) -> dict:
    """The first output's agreement figures, top-1 agreement in percent like every accuracy in edgec."""
    first = dict(next(iter(compared["outputs"].values())))
    if "top1_agreement" in first:
        first["top1_agreement"] = round(100 * first["top1_agreement"], 4)
    return {"samples": compared["samples"], **first, "outputs": list(compared["outputs"])}


def stage_take_int8(int8: Path, source: Path, record: dict) -> Stage:
    """An INT8 model produced by another recipe (quantization-aware training) instead of calibration."""
    import shutil
    stage = Stage("quantize", "an INT8 ONNX model made by another recipe", "model.onnx: copied, not recalibrated",
                  options={"source": str(source)}, metrics=plain(record))
    with timed(stage):
        shutil.copyfile(source, int8)
    return stage


def stage_evaluate(fp32: Path, int8: Path, inputs: Inputs, max_drop: float | None,
                   fallback: dict | None = None) -> Stage:
    """FP32 vs INT8 on held-out data, every output: SQNR always, the task figure where the task is known (with
    labels on the output they are tied to, else agreement with FP32); the gate fails the build on either."""
    from edgec.exporters.compare import auto_batch
    from edgec.exporters.metrics import CheckOptions, compare_models, failures
    checks = dataclasses.replace(inputs.checks or CheckOptions(), max_drop=max_drop)
    stage = Stage("evaluate", "both ONNX models + eval data",
                  "per output: SQNR, task figure (labels on the output named) or agreement with FP32",
                  options={"max_accuracy_drop": max_drop, "min_sqnr_db": checks.min_sqnr,
                           "tasks": dict(checks.tasks), "label_output": checks.label_output})
    with timed(stage):
        data = inputs.eval if inputs.eval is not None else inputs.calib   # streamed batch by batch
        stage.metrics["data"] = data.describe()
        batches = data.batches(auto_batch(data.bytes_per_sample()))   # ~8 MB of inputs: ORT arenas stay small
        outputs = compare_models(fp32, int8, batches, data.y, checks, num_classes=num_classes(data))
        stage.metrics["outputs"] = outputs
        for o in outputs:
            note(f"output {o['name']}: {o['task']} ({o['chosen']}{': ' + o['why'] if o['why'] else ''}); "
                 + "SQNR " + ("identical" if o["identical"] else f"{o['sqnr_db']} dB")
                 + (f", {o['metric']} FP32 {o['fp32']:.2f} INT8 {o['int8']:.2f}" if o.get("metric") else ""))
        stage.metrics["agreement"] = agreement_summary(outputs)
        labelled = next((o for o in outputs if o["labels"] and o["task"] == "classify"), None)
        if labelled is not None:  # the accuracy figures the manifest and compare have always carried
            fp, q = labelled["fp32_accuracy"], labelled["int8_accuracy"]
            stage.metrics.update(fp32_accuracy=fp, int8_accuracy=q, accuracy_drop=round(fp - q, 4),
                                 label_output=labelled["name"])
        failed = failures(outputs, checks)
        stage.metrics["gate"] = {"passed": not failed, "failures": failed}
        if failed:
            tried = (f"; the fallback kept {len(fallback['excluded'])} node(s) in FP32 ({fallback['stopped']})"
                     if fallback else "")
            raise BudgetExceeded(
                f"INT8 fails the checks: {'; '.join(failed)}{tried}; try --calibration percentile|auto, other "
                "--data, a longer --fallback-seconds, --exclude-op-types, or relax --max-accuracy-drop/--min-sqnr")
    return stage


def agreement_summary(outputs: list[dict]) -> dict:
    """The short agreement record (samples, outputs, worst SQNR, top-1 agreement of the first classifier)."""
    sqnrs = [o["sqnr_db"] for o in outputs if not o["identical"]]  # None: a zero reference, the worst case
    out = {"samples": outputs[0]["samples"], "outputs": [o["name"] for o in outputs],
           "min_sqnr_db": None if None in sqnrs else min(sqnrs, default=None)}
    first = next((o for o in outputs if o["task"] == "classify"), None)
    if first is not None:
        out["top1_agreement"] = first["top1_agreement"]
    return out


def stage_bench(int8: Path, fp32: Path, providers: list[str], seconds: float, shapes: dict | None = None) -> Stage:
    """`shapes`: {input: dims} at which to time (one real sample's: the data's sequence lengths)."""
    from edgec.runtime import benchmark
    stage = Stage("bench", "ONNX models", "latency per execution provider (INT8 and FP32 each alone, as `edgec "
                  "bench` measures them; their ratio from interleaved runs)",
                  options={"providers": providers, "seconds_per_model": seconds, "shapes": shapes})
    with timed(stage):
        # each model alone: the figure the gate (`edgec bench PKG`) measures; interleaved only for the paired ratio
        int8s, fp32s = (benchmark([m], providers=providers, runs=f"{seconds}s", warmup="5", shapes=shapes)
                        for m in (int8, fp32))
        pair = benchmark([int8, fp32], providers=providers, runs=f"{seconds}s", warmup="5", shapes=shapes,
                         inspect=False)
        stage.metrics = {r.ep: {"int8": r.to_json(), "fp32": f.to_json(),   # FP32/INT8 time, round by round:
                                "fp32_over_int8_interleaved": paired.ratio}  # robust to drift between the runs
                         for r, f, paired in zip(int8s, fp32s, pair[len(pair) // 2:])}   # models x providers
    return stage


# ---------------------------------------------------------------- build

@dataclass
class BuildOptions:
    model: str
    output: str
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple | None = None
    data: str = "builtin:digits"
    eval_data: str | None = None
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    opset: int = 17
    quant: object = None                 # edgec.exporters.quantize.QuantOptions; None = defaults for this host
    max_accuracy_drop: float | None = 1.0
    min_sqnr: float | None = None        # dB, every output; None = edgec.exporters.metrics.DEFAULT_MIN_SQNR
    tasks: dict = field(default_factory=dict)  # output name -> task (--task); "" = the only output
    label_output: str | None = None      # the output labels apply to (--label-output); "none" ignores them
    fallback_seconds: float = 300.0      # time box of the sensitivity fallback; 0 = fail instead of falling back
    min_cosine: float | None = None      # without labels: the fallback's budget as mean cosine to FP32 instead
    providers: tuple = ("cpu",)
    bench_seconds: float = 2.0           # per model and provider; 0 = no benchmark
    prune: object = None                 # edgec.prune.PruneConfig or None
    distill: object = None               # edgec.train.TrainConfig or None (fine-tune/distill after pruning)
    force: bool = False
    extra: dict = field(default_factory=dict)  # recorded verbatim in the manifest (e.g. {"demo": true})
    prebuilt_int8: tuple | None = None   # (path, record): an INT8 model made elsewhere (compare's QAT) replaces PTQ
    sign_key: str | None = None          # NAME.key from `edgec keygen`: the package is signed before it appears


def build(opts: BuildOptions):
    """Run every stage and write the package; returns its manifest (edgec.core.package.Manifest)."""
    from edgec import package
    from edgec.exporters.quantize import QuantOptions

    started = time.perf_counter()
    if opts.max_accuracy_drop is not None and not opts.max_accuracy_drop >= 0:  # `not >=`: nan is refused too
        raise OptionError(f"--max-accuracy-drop {opts.max_accuracy_drop}: a budget in points, 0 or more")
    if not opts.fallback_seconds >= 0:
        raise OptionError(f"--fallback-seconds {opts.fallback_seconds}: 0 (no fallback) or more")
    from edgec.core.fsutil import check_writable
    reads = (opts.model, opts.data, opts.eval_data)
    check_writable(opts.output, opts.force, inputs=reads, directory=True)  # fail before hours of work, not after
    from edgec.core.signing import load_private_key
    sign_key = load_private_key(opts.sign_key) if opts.sign_key else None  # a wrong key fails now, not after
    from edgec.exporters.metrics import DEFAULT_MIN_SQNR, CheckOptions
    checks = CheckOptions(dict(opts.tasks), opts.label_output,
                          DEFAULT_MIN_SQNR if opts.min_sqnr is None else opts.min_sqnr, opts.max_accuracy_drop)
    inputs = load_inputs(opts.model, arch=opts.arch, trust_pickle=opts.trust_pickle,
                         input_shape=opts.input_shape, data=opts.data, eval_data=opts.eval_data,
                         image_size=opts.image_size, mean=opts.mean, std=opts.std, checks=checks)
    stages = [stage_load(inputs)]
    module = inputs.model.module
    original = module
    if opts.prune is not None:
        module, stage = stage_prune(inputs, opts.prune)
        stages.append(stage)
    if opts.distill is not None:
        stages.append(stage_distill(original, module, inputs, opts.distill))
    quant = opts.quant if opts.quant is not None else QuantOptions()
    with atomic_path(opts.output, force=opts.force, directory=True, inputs=reads) as tmp:
        fp32, int8 = tmp / package.FP32_FILE, tmp / package.MODEL_FILE
        stages.append(stage_export(module, inputs, fp32, opts.opset))
        if opts.prebuilt_int8 is not None:
            stages.append(stage_take_int8(int8, *opts.prebuilt_int8))
        else:
            stages.append(stage_quantize(fp32, int8, inputs, quant, opts.max_accuracy_drop, opts.fallback_seconds,
                                         opts.min_cosine))
        stages.append(stage_evaluate(fp32, int8, inputs, opts.max_accuracy_drop,
                                     stages[-1].metrics.get("sensitivity")))
        if opts.bench_seconds > 0 and opts.providers:
            stages.append(stage_bench(int8, fp32, list(opts.providers), opts.bench_seconds,
                                      {k: list(v.shape) for k, v in inputs.calib.head(1).items()}))
        manifest = package.make_manifest(tmp, inputs, module, stages, extra=opts.extra,
                                         seconds=time.perf_counter() - started)
        package.write_package_files(tmp, manifest, sign_key=sign_key)
    return manifest


def stage_prune(inputs: Inputs, cfg) -> tuple:
    from edgec.prune import prune_model
    if not inputs.model.eager:
        raise OptionError(f"--prune needs an eager model (checkpoint + --arch or an edgec model file); "
                          f"{inputs.model.path} is {inputs.model.kind}")
    stage = Stage("prune", "eager module (+ data for Taylor importance)", "module with channels removed",
                  options=plain(cfg))
    with timed(stage):
        import copy
        pruned, record = prune_model(copy.deepcopy(inputs.model), cfg, inputs.calib)
        stage.metrics = plain(record)
    return pruned, stage


def training_split(calib: Dataset) -> tuple[Dataset, Dataset | None]:
    """(train, validation): the best epoch is picked on data held out of training, not on the eval data
    whose accuracy is reported. Unlabelled or tiny data: no validation, the last epoch is kept."""
    if not calib.labelled or len(calib) < 50:
        return calib, None
    return split(calib, VALIDATION_FRACTION)


def stage_distill(teacher, student, inputs: Inputs, cfg) -> Stage:
    from edgec.distill import distill
    stage = Stage("distill", "teacher + student + training data", "student trained on the teacher's soft targets",
                  options=plain(cfg))
    with timed(stage):
        train_data, validation = training_split(inputs.calib)
        stage.metrics = plain(distill(teacher, student, train_data, validation, cfg))
        stage.metrics["validation_samples"] = len(validation) if validation is not None else 0
    return stage
