"""The stage engine that build and compare share: typed artifacts in and out of each stage, a typed record per
stage. A stage is a function `(source, artifact(s), options) -> (artifact, record)`; its record class declares
what the stage needs and gives (recorded in the manifest, like Olive's passes) and renders itself as JSON once,
at the boundary (`to_dict`). Nothing reads a previous stage's results back out of a dict.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgec.core.errors import BudgetExceeded, OptionError
from edgec.core.progress import note
from edgec.source import Source, require_eager, training_split

EXPORT_CHECK_SAMPLES = 64
FALLBACK_SAMPLES = 512   # calibration samples at most that score sensitivity fallback candidates
DEFAULT_MIN_COSINE = 0.99   # without labels, the fallback's budget: every output's mean cosine to FP32 (issue 12)
KD_LR = 0.01             # peak learning rate of distillation after pruning (build --distill, compare prune-kd)


def plain(obj):
    """Dataclasses, numpy scalars and paths -> JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
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


# ---------------------------------------------------------------- artifacts

@dataclass(frozen=True)
class TorchModel:
    """An eager/TorchScript/exported module in memory, as a stage takes or gives it."""
    module: Any
    arch: str | None = None


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX file on disk, identified by its bytes: what is measured is what is shipped."""
    path: Path
    sha256: str
    precision: str = "fp32"           # fp32 | fp16 | int8

    @classmethod
    def at(cls, path, precision: str = "fp32") -> "OnnxModel":
        from edgec.core.package import file_record
        return cls(Path(path), file_record(Path(path)).sha256, precision)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


# ---------------------------------------------------------------- records

@dataclass(kw_only=True)
class StageRecord:
    """What a stage needs and gives (class level), how long it took; subclasses hold the typed results."""
    name: ClassVar[str]
    needs: ClassVar[str]
    gives: ClassVar[str]
    seconds: float = 0.0

    def options(self) -> dict:
        return {}

    def metrics(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        return plain({"name": self.name, "needs": self.needs, "gives": self.gives, "options": self.options(),
                      "metrics": self.metrics(), "seconds": round(self.seconds, 3)})


class timed:
    """Announce a stage by what it gives (its record class says), and time it."""

    def __init__(self, record: type, gives: str | None = None, label: str | None = None):
        self.label = f"{label or record.name}: {gives or record.gives}"

    def __enter__(self):
        self.t0 = time.perf_counter()
        note(self.label)
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


@dataclass(kw_only=True)
class LoadRecord(StageRecord):
    name = "load"
    needs = "model file + data"
    gives = "eager/TorchScript module, validated data"
    model: dict
    params: int
    flops: int | None
    calib: dict
    eval: dict | None

    def options(self):
        return self.model

    def metrics(self):
        return {"params": self.params, "flops": self.flops, "calib": self.calib, "eval": self.eval}


@dataclass(kw_only=True)
class PruneRecord(StageRecord):
    name = "prune"
    needs = "eager module (+ data for Taylor importance)"
    gives = "module with channels removed"
    config: Any                        # edgec.prune.PruneConfig
    result: dict                       # prune_model's record: ratio, params/FLOPs before and after, channel plan

    def options(self):
        return plain(self.config)

    def metrics(self):
        return plain(self.result)


@dataclass(kw_only=True)
class DistillRecord(StageRecord):
    name = "distill"
    needs = "teacher + student + training data"
    gives = "student trained on the teacher's soft targets"
    config: Any                        # edgec.train.TrainConfig
    result: dict                       # edgec.distill.distill's record: accuracies, epochs
    validation_samples: int

    def options(self):
        return plain(self.config)

    def metrics(self):
        return {**plain(self.result), "validation_samples": self.validation_samples}


@dataclass(kw_only=True)
class ExportRecord(StageRecord):
    name = "export"
    needs = "torch module + example input"
    gives = "model.fp32.onnx checked against torch"
    opset: int
    dynamic_axes: dict                 # input name -> its dynamic axes, as exported
    info: Any                          # edgec.exporters.onnx_export.ExportInfo
    check: dict                        # ORT vs torch on real (or, said so, random) inputs
    check_data: str

    def options(self):
        return {"opset": self.opset, "dynamic_axes": self.dynamic_axes}

    def metrics(self):
        return {"export": plain(self.info), "check": {**self.check, "data": self.check_data}}


@dataclass(kw_only=True)
class QuantizeRecord(StageRecord):
    name = "quantize"
    needs = "model.fp32.onnx + calibration data (no labels needed)"
    quant: Any                         # edgec.exporters.quantize.QuantOptions
    info: Any                          # edgec.exporters.quantize.QuantInfo
    fallback: Any = None               # edgec.exporters.sensitivity.FallbackReport when the fallback ran
    budget: dict | None = None         # the fallback's accuracy budget and time box

    @property
    def gives(self):
        return "model.onnx: static INT8 (QDQ), ONNX Runtime calibration" + (
            "; sensitive nodes kept in FP32 when over the budget (accuracy drop; without labels also mean cosine to "
            "FP32)" if self.budget else "")

    def options(self):
        return {**plain(self.quant), "fallback": self.budget}

    def metrics(self):
        return plain(self.info)


@dataclass(kw_only=True)
class TakenInt8Record(StageRecord):
    name = "quantize"
    needs = "an INT8 ONNX model made by another recipe"
    gives = "model.onnx: copied, not recalibrated"
    source: str
    record: dict
    fallback: ClassVar[None] = None

    def options(self):
        return {"source": self.source}

    def metrics(self):
        return plain(self.record)


@dataclass(kw_only=True)
class EvaluateRecord(StageRecord):
    """The gate: INT8 against the FP32 model it was made from on held-out data, every output (SQNR always, the
    task figure where the task is known: labels on the output they are tied to, else agreement with FP32)."""
    name = "evaluate"
    needs = "both ONNX models + eval data"
    gives = "per output: SQNR, task figure (labels on the output named) or agreement with FP32"
    checks: Any                        # edgec.exporters.metrics.CheckOptions (max_drop included)
    data: dict
    outputs: list = field(default_factory=list)   # edgec.exporters.metrics.compare_models' per-output records
    agreement: dict | None = None      # the short summary: samples, outputs, worst SQNR, top-1 agreement
    reference_accuracy: float | None = None       # of the labelled classifier output, when there is one
    accuracy: float | None = None
    label_output: str | None = None
    failures: list = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return round(self.reference_accuracy - self.accuracy, 4)

    def options(self):
        c = self.checks
        return {"max_accuracy_drop": c.max_drop, "min_sqnr_db": c.min_sqnr, "tasks": dict(c.tasks),
                "label_output": c.label_output}

    def metrics(self):
        out = {"data": self.data, "outputs": self.outputs, "agreement": self.agreement}
        if self.accuracy is not None:  # the accuracy figures the manifest and compare have always carried
            out.update(fp32_accuracy=self.reference_accuracy, int8_accuracy=self.accuracy,
                       accuracy_drop=self.accuracy_drop, label_output=self.label_output)
        out["gate"] = {"passed": not self.failures, "failures": self.failures}
        return out


@dataclass
class Score:
    """A compare row's quality against the FP32 baseline, every output with the gate's figures: `quality` is the
    task figure of the headline output (the first labelled one, else the first with a figure: accuracy, F1,
    correlation, cosine, agreement), None where no output has one (SQNR is then the only figure); `failures`
    holds every output's broken checks; `accuracy` only where a labelled classifier output exists."""
    accuracy: float | None = None
    agreement: dict | None = None
    outputs: list = field(default_factory=list)
    quality: dict | None = None
    failures: list = field(default_factory=list)   # the gate's lines at compare's constraints


@dataclass(kw_only=True)
class BenchRecord(StageRecord):
    name = "bench"
    needs = "ONNX models"
    gives = ("latency per execution provider (INT8 and FP32 each alone, as `edgec bench` measures them; their "
             "ratio from interleaved runs)")
    providers: list
    seconds_per_model: float
    shapes: dict | None                # {input: dims} timed (one real sample's: the data's sequence lengths)
    int8: dict                         # ep -> edgec.bench/1 result
    fp32: dict = field(default_factory=dict)
    ratio: dict = field(default_factory=dict)   # ep -> FP32/INT8 time, round by round (robust to drift)

    def options(self):
        return {"providers": self.providers, "seconds_per_model": self.seconds_per_model, "shapes": self.shapes}

    def metrics(self):
        return {ep: {"int8": r, "fp32": self.fp32.get(ep), "fp32_over_int8_interleaved": self.ratio.get(ep)}
                for ep, r in self.int8.items()}


@dataclass
class StoredRecord:
    """A stage record read back from compare's cache: already JSON, rendered as it was recorded."""
    data: dict

    @property
    def name(self) -> str:
        return self.data["name"]

    def to_dict(self) -> dict:
        return self.data


# ---------------------------------------------------------------- stages

def load(source: Source) -> LoadRecord:
    from edgec.metrics import count_flops, count_params
    m = source.model
    return LoadRecord(model=m.describe(), params=count_params(m.module),
                      flops=count_flops(m.module, source.example()), calib=source.calib.describe(),
                      eval=source.eval.describe() if source.eval is not None else None)


def prune(source: Source, cfg) -> tuple[TorchModel, PruneRecord]:
    import copy
    from edgec.prune import prune_model
    require_eager(source.model, "pruning")
    with timed(PruneRecord) as t:
        pruned, result = prune_model(copy.deepcopy(source.model), cfg, source.calib)
    return TorchModel(pruned, source.model.arch), PruneRecord(config=cfg, result=result, seconds=t.seconds)


def distill(source: Source, student: TorchModel, cfg, *, label: str = "distill") -> tuple[TorchModel, DistillRecord]:
    """Train `student` (in place) on the source model's soft targets."""
    from edgec.distill import distill as run_distill
    with timed(DistillRecord, label=label) as t:
        train_data, validation = training_split(source.calib.for_output(cfg.label_output))
        result = run_distill(source.model.module, student.module, train_data, validation, cfg, label=label)
    return student, DistillRecord(config=cfg, result=result, seconds=t.seconds,
                                  validation_samples=len(validation) if validation is not None else 0)


def export(source: Source, model: TorchModel, path: Path, opset: int = 17) -> tuple[OnnxModel, ExportRecord]:
    """torch -> ONNX, then ORT vs torch on real samples (the eval data when there is some)."""
    from edgec.exporters.onnx_export import check_onnx_against_torch, export_onnx
    with timed(ExportRecord) as t:
        info = export_onnx(model.module, source.calib.head(1), path, opset=opset, inputs=source.specs)
        data = source.check_data
        check = check_onnx_against_torch(model.module, path, data.head(EXPORT_CHECK_SAMPLES))
    return OnnxModel.at(path), ExportRecord(opset=opset, dynamic_axes={s.name: s.dynamic_axes for s in source.specs},
                                            info=info, check=check, check_data=data.source, seconds=t.seconds)


def check_fallback_options(seconds: float, min_cosine: float | None) -> None:
    """--fallback-seconds and --min-cosine, as build and quantize take them."""
    if not seconds >= 0:
        raise OptionError(f"--fallback-seconds {seconds}: 0 (no fallback) or more")
    if min_cosine is not None and not 0 <= min_cosine <= 1:
        raise OptionError(f"--min-cosine {min_cosine}: a cosine within [0, 1] (e.g. 0.99; 0 turns the label-free "
                          "budget off)")


def fallback_budget(max_drop: float | None, seconds: float, min_cosine: float | None = DEFAULT_MIN_COSINE
                    ) -> dict | None:
    """The sensitivity fallback's budget and time box (None with no time, or with neither budget). With labels
    the budget is `max_drop` points of the task figures; without, every output's mean cosine to FP32 must reach
    `min_cosine` (0 or None: not a target) and the gate's agreement figures stay within `max_drop`
    (edgec.exporters.sensitivity)."""
    if seconds <= 0 or (max_drop is None and not min_cosine):
        return None
    return {"max_accuracy_drop": max_drop, "time_budget_s": seconds, "min_cosine": min_cosine or None}


def quantize(calib, fp32: OnnxModel, path: Path, options, budget: dict | None = None, checks=None
             ) -> tuple[OnnxModel, QuantizeRecord]:
    """Static INT8 calibrated on `calib`; with a budget, the most sensitive nodes fall back to FP32 until the
    budget holds on calibration samples (never on the eval data, which stays for the honest check after; those the
    calibration does not read where there are enough, edgec.exporters.sensitivity.holdout_split): with
    labels the drop of the gate's own task figures (`checks`), without them also every output's mean cosine to
    FP32 (`min_cosine`, the label-free default)."""
    from edgec.exporters.quantize import quantize_int8
    report = None
    with timed(QuantizeRecord, QuantizeRecord(quant=options, info=None, budget=budget).gives) as t:
        fallback = None
        if budget:
            from edgec.exporters.sensitivity import FallbackOptions
            labelled = calib.labelled
            fallback = FallbackOptions(max_accuracy_drop=budget["max_accuracy_drop"],
                                       time_budget_s=budget["time_budget_s"], checks=checks,
                                       num_classes=num_classes(calib),
                                       min_cosine=None if labelled else budget.get("min_cosine"))
            if fallback.max_accuracy_drop is None and fallback.min_cosine is None:
                fallback = None    # labelled data and no accuracy budget: nothing to search for
        if fallback is not None:
            from edgec.exporters.sensitivity import holdout_split, quantize_with_budget
            # the budget is scored on samples the calibration does not read, where there are enough (spread over
            # the data: folders are sorted by class)
            scored, held_out = holdout_split(len(calib), options.num_samples, FALLBACK_SAMPLES)
            scored = calib.take(scored)
            # re-read per candidate where that is cheap (memory-mapped arrays), else decoded once and kept
            x = scored if scored.rereadable else scored.head(len(scored))
            info, report = quantize_with_budget(fp32.path, path, calib, x, scored.labels, options, fallback,
                                                held_out=held_out)
        else:
            info = quantize_int8(fp32.path, path, calib, options)
    return OnnxModel.at(path, "int8"), QuantizeRecord(quant=options, info=info, fallback=report, budget=budget,
                                                      seconds=t.seconds)


def take_int8(made: OnnxModel, path: Path, record: dict) -> tuple[OnnxModel, TakenInt8Record]:
    """An INT8 model produced by another recipe (quantization-aware training) instead of calibration."""
    import shutil
    with timed(TakenInt8Record) as t:
        shutil.copyfile(made.path, path)
    return OnnxModel.at(path, "int8"), TakenInt8Record(source=str(made.path), record=record, seconds=t.seconds)


def num_classes(data) -> int | None:
    """The data's class count where the data says it (class folders, built-in data), for task detection."""
    return len(data.classes) if data.classes else None


def agreement_summary(outputs: list[dict]) -> dict:
    """The short agreement record (samples, outputs, worst SQNR, top-1 agreement of the first classifier)."""
    sqnrs = [o["sqnr_db"] for o in outputs if not o["identical"]]  # None: a zero reference, the worst case
    out = {"samples": outputs[0]["samples"], "outputs": [o["name"] for o in outputs],
           "min_sqnr_db": None if None in sqnrs else min(sqnrs, default=None)}
    first = next((o for o in outputs if o["task"] == "classify"), None)
    if first is not None:
        out["top1_agreement"] = first["top1_agreement"]
    return out


def evaluate(data, model: OnnxModel, reference: OnnxModel, checks,
             quantized: QuantizeRecord | TakenInt8Record | None = None) -> EvaluateRecord:
    """The gate of build and of compare --package: `model` vs `reference` (the FP32 model it was made from) on
    held-out `data` (Source.check_data), every output; a failed check is BudgetExceeded."""
    from edgec.exporters.compare import auto_batch
    from edgec.exporters.metrics import compare_models, failures, worst_part_text
    with timed(EvaluateRecord) as t:   # streamed in batches of ~8 MB of inputs: ORT arenas stay small
        batches = data.batches(auto_batch(data.bytes_per_sample()))
        outputs = compare_models(reference.path, model.path, batches, data.labels, checks,
                                 num_classes=num_classes(data))
        for o in outputs:
            note(f"output {o['name']}: {o['task']} ({o['chosen']}{': ' + o['why'] if o['why'] else ''}); "
                 + "SQNR " + ("identical" if o["identical"] else f"{o['sqnr_db']} dB") + worst_part_text(o)
                 + (f", {o['metric']} FP32 {o['fp32']:.2f} INT8 {o['int8']:.2f}" if o.get("metric") else ""))
        record = EvaluateRecord(checks=checks, data=data.describe(), outputs=outputs,
                                agreement=agreement_summary(outputs), failures=failures(outputs, checks))
        labelled = next((o for o in outputs if o["labels"] and o["task"] == "classify"), None)
        if labelled is not None:
            record.reference_accuracy, record.accuracy = labelled["fp32_accuracy"], labelled["int8_accuracy"]
            record.label_output = labelled["name"]
    record.seconds = t.seconds
    if record.failures:
        report = quantized.fallback if quantized is not None else None
        tried = (f"; the fallback kept {len(report.excluded)} node(s) in FP32 ({report.stopped})"
                 if report is not None else "")
        raise BudgetExceeded(
            f"INT8 fails the checks: {'; '.join(record.failures)}{tried}; try --calibration percentile|auto, other "
            "--data, a longer --fallback-seconds, --exclude-op-types, or relax --max-accuracy-drop/--min-sqnr")
    return record


def score(data, model: OnnxModel, baseline: OnnxModel, checks, sqnr_reference: OnnxModel | None = None) -> Score:
    """A compare row against the FP32 `baseline` (the original's export) on held-out `data`, every output:
    task figures on the labels of the output they apply to, else agreement with the baseline. The SQNR
    constraint is measured against `sqnr_reference`, the FP32 model the row was quantized from (None: a
    retrained model, whose SQNR against any FP32 model says nothing about quantization)."""
    import dataclasses
    import math

    from edgec.exporters.compare import auto_batch
    from edgec.exporters.metrics import compare_models, failures, worst_part_text
    with timed(EvaluateRecord, "every output against FP32: task figures (labels) or agreement, SQNR"):
        batch = auto_batch(data.bytes_per_sample())
        outputs = compare_models(baseline.path, model.path, data.batches(batch), data.labels, checks,
                                 num_classes=num_classes(data))
        gated = dataclasses.replace(checks, min_sqnr=-math.inf)
        lines = failures(outputs, gated)
        if sqnr_reference is not None:
            quant = outputs if sqnr_reference.sha256 == baseline.sha256 else compare_models(
                sqnr_reference.path, model.path, data.batches(batch), None, checks, num_classes=num_classes(data))
            lines += [f for f in failures(quant, dataclasses.replace(checks, max_drop=None))]
    labelled = next((o for o in outputs if o["labels"] and o["task"] == "classify"), None)
    figured = sorted((o for o in outputs if o.get("metric")), key=lambda o: not o["labels"])
    head = figured[0] if figured else None   # the same output on every row: one axis for the table and plot
    quality = None if head is None else {
        "metric": head["metric"], "output": head["name"], "task": head["task"], "labels": head["labels"],
        "fp32": head["fp32"], "value": head["int8"], "drop_points": round(head["drop_points"], 4)}
    return Score(accuracy=labelled["int8_accuracy"] if labelled else None, agreement=agreement_summary(outputs),
                 outputs=outputs, quality=quality, failures=lines)


def bench_models(models: list[OnnxModel], providers: list[str], seconds: float, *, shapes: dict | None = None,
                 inspect: bool = True) -> list[dict]:
    """All models interleaved in one run (their ratios survive machine drift): per model, {ep: bench result}.
    `shapes`: {input: dims} at which to time."""
    from edgec.runtime import benchmark
    results = benchmark([m.path for m in models], providers=list(providers), runs=f"{seconds}s", warmup="5",
                        shapes=shapes, inspect=inspect)
    per_model = len(results) // len(models)   # ordered models x providers
    return [{r.ep: r.to_json() for r in results[i * per_model:(i + 1) * per_model]} for i in range(len(models))]


def bench(int8: OnnxModel, fp32: OnnxModel, providers: list[str], seconds: float,
          shapes: dict | None = None) -> BenchRecord:
    """Each model alone: the figure the gate (`edgec bench PKG`) measures; interleaved only for the paired ratio."""
    from edgec.runtime import benchmark
    with timed(BenchRecord) as t:
        (q,), (f,) = (bench_models([m], providers, seconds, shapes=shapes) for m in (int8, fp32))
        pair = benchmark([int8.path, fp32.path], providers=list(providers), runs=f"{seconds}s", warmup="5",
                         shapes=shapes, inspect=False)
        ratio = {r.ep: r.ratio for r in pair[len(pair) // 2:]}   # models x providers: FP32's, against INT8
    return BenchRecord(providers=list(providers), seconds_per_model=seconds, shapes=shapes, int8=q, fp32=f,
                       ratio=ratio, seconds=t.seconds)
