"""`edgec compare`: compression recipes side by side on the same model, data and execution providers.

A recipe is a sequence of edgec.stages' stages (the same export with its ORT-vs-torch check, quantization,
evaluation and benchmark that `build` runs). Every artifact is cached under the hash of what it was made from
(cache/<kind>-<hash>/): the FP32 export, the calibrated INT8 models and the pruned student are made once and
reused by every recipe and by a rerun (unless --fresh). Each row is one `Row`; all rows are benchmarked
interleaved in one run, so their ratios survive machine drift. A recipe that fails is reported in its row and
does not lose the others. `--package` writes the measured bytes of the recommended INT8 recipe, through the
same accuracy gate as `build`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgec import stages
from edgec.core.errors import EdgecError, OptionError, VerifyError
from edgec.core.package import Latency
from edgec.core.package import Source as ModelInfo
from edgec.core.progress import note
from edgec.core.records import Record, RecordError
from edgec.recommend import Recommendation
from edgec.source import Source, SourceSpec, load_source, require_eager, training_split
from edgec.stages import OnnxModel, StoredRecord, TorchModel, plain

RECIPES = {
    "fp32": "the original model in ONNX Runtime (baseline)",
    "ptq-int8": "static INT8, ONNX Runtime calibration (one row per calibration method)",
    "fp16": "FP16 weights and activations (onnxruntime.transformers.float16); meant for GPU providers",
    "prune-kd": "structured pruning + knowledge distillation, FP32",
    "prune-kd-ptq": "structured pruning + distillation, then static INT8",
    "qat-kd": "quantization-aware fine-tuning with the teacher's soft targets, exported as INT8 QDQ",
}
CALIBRATIONS = ("minmax", "entropy", "percentile")
RESULT_SCHEMA = "edgec.compare/1"
COMPARE_MARKER = ".edgec-compare"  # in every folder compare writes: a rerun may reuse and overwrite it
OPSET = 17


def _kd_defaults():
    from edgec.train import TrainConfig
    return TrainConfig(lr=stages.KD_LR)


@dataclass
class CompareOptions:
    source: SourceSpec
    output: str
    recipes: tuple = tuple(RECIPES)
    calibrations: tuple = CALIBRATIONS
    providers: tuple = ("cpu",)
    prune_ratio: float = 0.5
    distill: object = field(default_factory=_kd_defaults)   # edgec.train.TrainConfig after pruning
    qat_epochs: int = 3
    bench_seconds: float = 3.0
    fresh: bool = False
    # constraints for the recommendation (and the accuracy gate of --package): build's by default
    max_accuracy_drop: float | None = 1.0
    min_sqnr: float | None = None    # dB, every output of a quantized recipe; None = build's default
    tasks: dict = field(default_factory=dict)   # output name -> task (--task), as build
    label_output: str | None = None  # the output the plain labels apply to (--label-output), as build
    budgets: tuple = ()              # e.g. ("p90=10ms",), on the first provider
    max_size: int | None = None      # bytes
    prefer: str = "latency"          # latency | size
    package: str | None = None       # write the recommended INT8 recipe as a .edgec package here
    force: bool = False              # replace an existing package

    def validate(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise OptionError(f"unknown recipe(s) {unknown or '(none)'}; choose from {', '.join(RECIPES)}")
        bad = [c for c in self.calibrations if c not in CALIBRATIONS]
        if bad or not self.calibrations:
            raise OptionError(f"--calibration {bad or '(none)'}: choose from {', '.join(CALIBRATIONS)}")
        if self.prefer not in ("latency", "size"):
            raise OptionError(f"--prefer {self.prefer!r}: choose latency or size")
        if not 0 < self.prune_ratio < 1:
            raise OptionError(f"--prune-ratio {self.prune_ratio} must be between 0 and 1")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise OptionError(f"--max-accuracy-drop {self.max_accuracy_drop}: a budget in points, 0 or more")
        if self.qat_epochs < 1:   # -1 ran the qat-kd row with no training at all and reported it
            raise OptionError(f"--qat-epochs {self.qat_epochs} must be at least 1")
        if not 0 <= self.bench_seconds < float("inf"):
            raise OptionError(f"--bench-seconds {self.bench_seconds}: 0 (no benchmark) or more")
        from edgec.runtime.providers import resolve
        for ep in self.providers if self.bench_seconds > 0 else ():   # a missing provider fails now, not after
            resolve(ep)                                                 # every recipe is trained
        self.distill.validate()
        self.checks().validate()
        from edgec.recommend import parse_budgets
        parse_budgets(self.budgets)

    def checks(self):
        """Every row's per-output figures, and --package's gate: build's (edgec.exporters.metrics.CheckOptions)."""
        from edgec.exporters.metrics import DEFAULT_MIN_SQNR, CheckOptions
        return CheckOptions(dict(self.tasks), self.label_output,
                            DEFAULT_MIN_SQNR if self.min_sqnr is None else self.min_sqnr, self.max_accuracy_drop)


@dataclass
class RowLatency(Record):
    """One row's latency on one execution provider (from its edgec.bench/1 result), and its speed-up over FP32."""
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    p50_ci_ms: list[float] | None
    runs: int
    reliable: dict[str, bool] = field(default_factory=dict)
    speedup: float | None = None     # FP32 p50 / this p50, set against the FP32 row

    @classmethod
    def from_bench(cls, result: dict) -> "RowLatency":
        lat = Latency.from_bench(result)   # the one reader of a bench result
        return cls(min_ms=lat.min_ms, mean_ms=lat.mean_ms, p50_ms=lat.p50_ms, p90_ms=lat.p90_ms, p95_ms=lat.p95_ms,
                   p99_ms=lat.p99_ms, max_ms=lat.max_ms, p50_ci_ms=lat.p50_ci_ms, runs=lat.n, reliable=lat.reliable)

    def to_json(self) -> dict:
        out = super().to_json()
        return {k: v for k, v in out.items() if k != "speedup" or v is not None}


@dataclass
class RowAgreement(Record):
    """Every output of a row against FP32 (stages.agreement_summary): the worst SQNR, top-1 agreement of the first
    classifier output where there is one."""
    samples: int
    outputs: list[str]
    min_sqnr_db: float | None = None     # None: identical outputs, or a zero reference
    top1_agreement: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = super().to_json()
        return {k: v for k, v in out.items() if k != "top1_agreement" or v is not None}


@dataclass
class Quality(Record):
    """A row's headline task figure against FP32 (the first labelled output with one, else the first with one)."""
    metric: str
    output: str
    task: str
    labels: bool
    fp32: float | None
    value: float | None
    drop_points: float


@dataclass
class Row(Record):
    """One recipe's result: what compare.json lists, what recommend ranks, what --package ships."""
    recipe: str
    key: str
    precision: str | None = None
    onnx: str | None = None          # relative to the compare folder
    sha256: str | None = None        # of the measured file: --package ships exactly these bytes
    reference: str | None = None     # the FP32 ONNX it was made from (a package's model.fp32.onnx)
    student: str | None = None       # the pruned + distilled model file, for pruned recipes
    bytes: int | None = None
    params: int | None = None
    flops: int | None = None
    accuracy: float | None = None    # a labelled classifier output's, only where there is one
    agreement: RowAgreement | None = None
    quality: Quality | None = None   # the gated task figure of the headline output vs FP32 (stages.Score)
    outputs: list[dict] = field(default_factory=list)   # every output's figures against the FP32 baseline
    failures: list[str] = field(default_factory=list)   # the per-output checks broken at compare's constraints
    details: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)   # stage records (JSON) up to the model: the package's manifest
    error: str | None = None
    seconds: float = 0.0
    # filled in by the benchmark and against the FP32 row
    bench: dict[str, dict] = field(default_factory=dict)        # ep -> edgec.bench/1 result
    latency: dict[str, RowLatency] = field(default_factory=dict)
    compression_ratio: float | None = None
    accuracy_change: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = None

    def to_json(self) -> dict:
        out = super().to_json()
        return plain({k: v for k, v in out.items() if v is not None or k in ("onnx", "error", "accuracy")})


@dataclass
class EvalInfo(Record):
    """The eval data a compare run scored on (edgec.data's describe())."""
    source: str
    samples: int
    extra: dict = field(default_factory=dict)


@dataclass
class CompareSummary(Record):
    """The edgec.compare/1 document (compare.json, `compare --json`); the table, report.md and plots read it."""
    schema: str
    model: ModelInfo
    eval: EvalInfo
    providers: list[str]
    recipes: list[Row]
    recommendation: Recommendation
    plots: list[str] = field(default_factory=list)
    package: str | None = None       # the package --package wrote

    def to_json(self) -> dict:
        out = plain(super().to_json())
        return {k: v for k, v in out.items() if k != "package" or v is not None}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(plain(key), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Entry(Record):
    """A cache entry's record.json: the stage records that made its files (an ONNX entry: its model's sha256)."""
    stages: list[dict] = field(default_factory=list)
    sha256: str | None = None
    details: dict = field(default_factory=dict)


class Cache:
    """Entries keyed by the hash of their inputs: cache/<kind>-<hash>/ holding files and record.json.
    --fresh makes each entry again, once per run (then the fresh entry is shared like any other)."""

    def __init__(self, root: Path, fresh: bool):
        self.root, self.fresh, self.made = root / "cache", fresh, set()

    def folder(self, kind: str, key: dict) -> Path:
        return self.root / f"{kind}-{_digest(key)}"

    def get(self, kind: str, key: dict, record: type[Record] = Entry) -> tuple[Path, Record | None]:
        """The entry's folder and its record; None when it must be made (missing, unreadable, from another
        version of edgec, or --fresh)."""
        folder = self.folder(kind, key)
        path = folder / "record.json"
        if (self.fresh and folder not in self.made) or not path.is_file():
            return folder, None
        try:
            return folder, record.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, RecordError):
            return folder, None

    def put(self, folder: Path, make: Callable[[Path], Record]) -> Record:
        """make(tmp folder) writes the files and returns the record; the entry appears only once complete."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            record = make(tmp)
            (tmp / "record.json").write_text(json.dumps(plain(record.to_json()), indent=2))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.made.add(folder)
        return record

    def onnx(self, kind: str, key: dict, precision: str, make: Callable[[Path], Entry]) -> tuple[OnnxModel, Entry]:
        """An ONNX artifact (folder/model.onnx) and its record; reused only while its bytes are the recorded ones."""
        folder, record = self.get(kind, key)
        if record is not None:
            model = OnnxModel.at(folder / "model.onnx", precision) if (folder / "model.onnx").is_file() else None
            if model is not None and model.sha256 == record.sha256:
                return model, record
        def made(tmp: Path) -> Entry:
            entry = make(tmp / "model.onnx")
            entry.sha256 = OnnxModel.at(tmp / "model.onnx").sha256
            return entry
        record = self.put(folder, made)
        return OnnxModel.at(folder / "model.onnx", precision), record


@dataclass
class Made:
    """What a recipe made, before evaluation: the model, what it was made from, its stage records."""
    model: OnnxModel
    stages: list                     # stage records as JSON
    module: object                   # the torch module it came from (params, FLOPs)
    reference: OnnxModel | None = None
    student: Path | None = None
    details: dict = field(default_factory=dict)


class Run:
    """One compare run: the source, the options, the cache; each method is a recipe or an artifact they share."""

    def __init__(self, opts: CompareOptions, source: Source):
        self.opts, self.source, self.root = opts, source, Path(opts.output)
        self.cache = Cache(self.root, opts.fresh)
        self.checks = opts.checks()
        self.load = stages.load(source).to_dict()

    # ---- shared artifacts
    def fp32(self) -> tuple[OnnxModel, Entry]:
        def make(path):
            _, record = stages.export(self.source, TorchModel(self.source.model.module), path, OPSET)
            return Entry(stages=[record.to_dict()])
        return self.cache.onnx("fp32", {"source": self.source.fingerprint, "opset": OPSET}, "fp32", make)

    def int8(self, fp32: OnnxModel, method: str) -> tuple[OnnxModel, Entry]:
        from edgec.exporters.quantize import QuantOptions
        quant = QuantOptions(method=method)
        def make(path):
            _, record = stages.quantize(self.source.calib, fp32, path, quant)
            return Entry(stages=[record.to_dict()])
        return self.cache.onnx("int8", {"fp32": fp32.sha256, "calib": self.source.fingerprint,
                                        "quant": plain(quant)}, "int8", make)

    def student_key(self) -> dict:
        return {"source": self.source.fingerprint, "prune_ratio": self.opts.prune_ratio,
                "distill": plain(self.opts.distill)}

    def student(self) -> tuple[Path, Entry]:
        """Prune + distill once; prune-kd and prune-kd-ptq share the student."""
        from edgec.modelio import save_model
        from edgec.prune import PruneConfig
        require_eager(self.source.model, "pruning")
        folder, record = self.cache.get("student", self.student_key())
        if record is not None and (folder / "student.pt").is_file():
            return folder / "student.pt", record

        def make(tmp):
            loaded = self.source.model
            pruned, prune_record = stages.prune(self.source, PruneConfig(ratio=self.opts.prune_ratio))
            student, distill_record = stages.distill(self.source, pruned, self.opts.distill, label="prune-kd: distill")
            save_model(tmp / "student.pt", student.module, loaded.arch, self.source.input_shape, force=True,
                       history=list(loaded.meta.get("history", [])) + [
                           {"stage": "prune", **prune_record.metrics()}, {"stage": "distill", **distill_record.metrics()}])
            return Entry(stages=[prune_record.to_dict(), distill_record.to_dict()])
        return folder / "student.pt", self.cache.put(folder, make)

    def student_fp32(self) -> tuple[OnnxModel, list, Path, object]:
        from edgec.modelio import load_model
        path, record = self.student()
        module = load_model(path, self.source.model.arch).module  # the spec the user already trusted

        def make(onnx_path):
            _, export = stages.export(self.source, TorchModel(module), onnx_path, OPSET)
            return Entry(stages=[export.to_dict()])
        fp32, exported = self.cache.onnx("student-fp32", {"student": self.student_key(), "opset": OPSET}, "fp32",
                                         make)
        return fp32, record.stages + exported.stages, path, module

    # ---- recipes
    def recipe_fp32(self) -> Made:
        fp32, record = self.fp32()
        return Made(fp32, record.stages, self.source.model.module)

    def recipe_ptq(self, method: str) -> Made:
        fp32, exported = self.fp32()
        int8, record = self.int8(fp32, method)
        return Made(int8, exported.stages + record.stages, self.source.model.module, reference=fp32,
                    details={"calibration": method})

    def recipe_fp16(self) -> Made:
        fp32, exported = self.fp32()

        def make(path):
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16
            # keep_io_types: callers still feed and read float32, the graph inside runs in float16
            onnx.save(convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True), str(path))
            return Entry()
        fp16, _ = self.cache.onnx("fp16", {"fp32": fp32.sha256}, "fp16", make)
        return Made(fp16, exported.stages, self.source.model.module, reference=fp32,
                    details={"note": "CPU providers have few FP16 kernels: expect FP16 to be slower than FP32 there; "
                                     "it is meant for CUDA/TensorRT"})

    def recipe_prune_kd(self) -> Made:
        fp32, made_by, path, module = self.student_fp32()
        return Made(fp32, made_by, module, student=path)

    def recipe_prune_kd_ptq(self) -> Made:
        fp32, made_by, path, module = self.student_fp32()
        int8, quantized = self.int8(fp32, "minmax")
        return Made(int8, made_by + quantized.stages, module, reference=fp32, student=path,
                    details={"calibration": "minmax"})

    def recipe_qat(self) -> Made:
        import copy

        from edgec.qat import QatConfig, export_qat_onnx, qat_finetune
        source = self.source
        require_eager(source.model, "qat-kd")
        fp32, exported = self.fp32()
        cfg = QatConfig(epochs=self.opts.qat_epochs, seed=self.opts.distill.seed)

        kd = self.opts.distill

        def make(path):
            # dict batches of every input (ids + mask as well as images); labels of --label-output, as prune-kd
            train_data, validation = training_split(source.calib.for_output(kd.label_output))
            qat_model, record = qat_finetune(copy.deepcopy(source.model.module), source.model.module, train_data,
                                             validation, cfg, label_output=kd.label_output, kd_loss=kd.kd_loss)
            # torch (fake quant) and ORT measured on the same eval samples: the QAT promise is that they agree
            check = source.check_data.for_output(kd.label_output)
            export = export_qat_onnx(qat_model, source.calib.head(1), path, eval_data=check, inputs=source.specs,
                                     label_output=kd.label_output)
            details = {"qat": plain(record), "export": plain(export)}
            check = export.get("check") or {}
            if check.get("torch_accuracy") is not None:
                details["torch_vs_ort_points"] = round(check["torch_accuracy"] - check["ort_accuracy"], 4)
            taken = stages.TakenInt8Record(source="quantization-aware training (compare qat-kd)", record=details)
            return Entry(stages=[taken.to_dict()], details=details)
        int8, record = self.cache.onnx("qat", {"source": source.fingerprint, "qat": plain(cfg),
                                               "label_output": kd.label_output, "kd_loss": plain(kd.kd_loss)},
                                       "int8", make)
        return Made(int8, exported.stages + record.stages, source.model.module, reference=fp32,
                    details=record.details)

    # ---- rows
    def planned(self) -> list[tuple[str, Callable[[], Made], dict]]:
        """(row, recipe, what the row depends on beyond the source)."""
        o = self.opts
        student = {"prune_ratio": o.prune_ratio, "distill": plain(o.distill)}
        rows = []
        for recipe in (["fp32"] if "fp32" not in o.recipes else []) + list(o.recipes):
            if recipe == "ptq-int8":   # every ratio is against FP32: it is always measured
                rows += [(f"ptq-int8-{m}", lambda m=m: self.recipe_ptq(m), {}) for m in o.calibrations]
            else:
                rows.append((recipe, {"fp32": self.recipe_fp32, "fp16": self.recipe_fp16,
                                      "prune-kd": self.recipe_prune_kd, "prune-kd-ptq": self.recipe_prune_kd_ptq,
                                      "qat-kd": self.recipe_qat}[recipe],
                             student if recipe.startswith("prune") else
                             {"qat_epochs": o.qat_epochs} if recipe == "qat-kd" else {}))
        return rows

    def row(self, name: str, recipe: Callable[[], Made], depends: dict) -> Row:
        key = {"recipe": name, "source": self.source.fingerprint, "opset": OPSET, "checks": plain(self.checks),
               **depends}
        folder, saved = self.cache.get("row", key, Row)
        if saved is not None and self._intact(saved):
            note(f"{name}: reusing the result saved in {folder} (--fresh recomputes)")
            return saved
        note(f"{name}: {RECIPES.get(name, RECIPES['ptq-int8'])}")
        started = time.perf_counter()
        row = Row(recipe=name, key=_digest(key))
        try:
            made = recipe()
            baseline, _ = self.fp32()
            # SQNR measures quantization: against the FP32 model a row was calibrated from, never a retrained one
            sqnr_reference = made.reference if made.reference is not None and name != "qat-kd" else None
            row = self._row(row, made, stages.score(self.source.check_data, made.model, baseline, self.checks,
                                                    sqnr_reference))
        except EdgecError as e:
            row.error = f"{type(e).__name__}: {e}"
            note(f"{name} failed: {e}")
        row.seconds = round(time.perf_counter() - started, 2)
        self.cache.put(folder, lambda tmp: row)
        return row

    def _intact(self, row: Row) -> bool:
        """A saved row stands while its model file still has the measured bytes (a failure stands as it is)."""
        if row.error is not None:
            return True
        path = self.root / row.onnx
        return path.is_file() and OnnxModel.at(path).sha256 == row.sha256

    def _row(self, row: Row, made: Made, evaluated) -> Row:
        from edgec.metrics import count_flops, count_params
        rel = lambda p: str(Path(p).relative_to(self.root)) if p is not None else None  # noqa: E731
        row.precision, row.onnx, row.sha256, row.bytes = (made.model.precision, rel(made.model.path),
                                                          made.model.sha256, made.model.bytes)
        row.reference = rel(made.reference.path) if made.reference is not None else None
        row.student = rel(made.student)
        row.params, row.flops = count_params(made.module), count_flops(made.module, self.source.example())
        row.accuracy = evaluated.accuracy
        row.agreement = RowAgreement.from_json(plain(evaluated.agreement)) if evaluated.agreement is not None else None
        row.quality = Quality.from_json(plain(evaluated.quality)) if evaluated.quality is not None else None
        row.outputs, row.failures = plain(evaluated.outputs), list(evaluated.failures)
        row.details, row.stages = made.details, [self.load, *made.stages]
        return row


# ---------------------------------------------------------------- run

def run_compare(opts: CompareOptions) -> CompareSummary:
    """Every planned recipe, evaluated, benchmarked, ranked; with opts.package, the winner packaged. Returns the
    summary as read back from the compare.json it wrote (the readers see what the file says)."""
    from edgec.core.fsutil import check_writable, claim_folder
    from edgec.plots import write_plots
    from edgec.recommend import recommend
    from edgec.report import render_compare_markdown
    opts.validate()
    if opts.package:  # checked before the comparison runs, not after minutes of work
        check_writable(opts.package, opts.force, inputs=(*_reads(opts), opts.output), directory=True)
    claim_folder(opts.output, COMPARE_MARKER, create=False)  # before minutes of work: never someone else's files
    source = load_source(opts.source, checks=opts.checks())
    root = claim_folder(opts.output, COMPARE_MARKER)
    run = Run(opts, source)
    rows = [run.row(*planned) for planned in run.planned()]
    _bench(run, rows)
    _relative(rows, opts.providers[0])
    summary = CompareSummary(schema=RESULT_SCHEMA, model=ModelInfo.from_json(plain(source.model.describe())),
                             eval=EvalInfo.from_json(plain(source.check_data.describe())),
                             providers=list(opts.providers), recipes=rows, recommendation=recommend(rows, opts))
    summary.plots = write_plots(summary, root)
    if opts.package:
        summary.package = package_winner(run, rows, summary.recommendation)
    document = summary.to_json()
    tmp = root / ".compare.json.tmp"
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, root / "compare.json")
    summary = CompareSummary.from_json(document)
    (root / "report.md").write_text(render_compare_markdown(summary))
    return summary


def _reads(opts: CompareOptions) -> tuple:
    return opts.source.model, opts.source.data, opts.source.eval_data


def _bench(run: Run, rows: list[Row]) -> None:
    """All successful rows, interleaved, per provider, in one run: the ratios are what to trust."""
    ok = [r for r in rows if r.onnx]
    if not ok or run.opts.bench_seconds <= 0:
        return
    note(f"benchmarking {len(ok)} models interleaved on {', '.join(run.opts.providers)}")
    measured = stages.bench_models([OnnxModel(run.root / r.onnx, r.sha256, r.precision) for r in ok],
                                   list(run.opts.providers), run.opts.bench_seconds,
                                   shapes=run.source.sample_shapes(), inspect=False)
    for row, per_ep in zip(ok, measured):
        row.bench = per_ep
        row.latency = {ep: RowLatency.from_bench(result) for ep, result in per_ep.items()}


def _relative(rows: list[Row], first_ep: str) -> None:
    """Compression, accuracy change and speed-up against the FP32 row; the first provider's figures on top."""
    base = next((r for r in rows if r.recipe == "fp32" and r.onnx), None)
    if base is None:
        return
    for r in rows:
        if not r.onnx:
            continue
        r.compression_ratio = round(base.bytes / r.bytes, 3)
        if r.accuracy is not None and base.accuracy is not None:
            r.accuracy_change = round(r.accuracy - base.accuracy, 4)
        for ep, lat in r.latency.items():
            b = base.latency.get(ep)
            if b is not None and lat.p50_ms:
                lat.speedup = round(b.p50_ms / lat.p50_ms, 3)
        first = r.latency.get(first_ep)
        if first is not None:
            r.p50_ms, r.p90_ms, r.speedup = first.p50_ms, first.p90_ms, first.speedup


def package_winner(run: Run, rows: list[Row], recommendation: Recommendation) -> str:
    """Package the recommended recipe; a package's model.onnx is INT8, so a non-INT8 winner gives way to the
    best INT8 recipe (said so)."""
    from edgec.recommend import recommend
    by_name = {r.recipe: r for r in rows}
    winner = recommendation.recipe
    if winner is not None and by_name[winner].precision != "int8":
        overall = winner
        winner = recommend([r for r in rows if r.precision == "int8"], run.opts).recipe
        if winner is not None:
            note(f"--package: {overall} is recommended but is not INT8; packaging {winner}, the best INT8 recipe")
    if winner is None:
        raise OptionError("no INT8 recipe meets the constraints, so there is nothing to --package; relax them")
    package_row(run, by_name[winner], rows, run.opts.package, force=run.opts.force)
    return str(run.opts.package)


def package_row(run: Run, row: Row, rows: list[Row], path, *, force: bool = False,
                max_accuracy_drop: float | None = None):
    """Write `row`'s measured INT8 model (the same bytes) as a package, through build's accuracy gate (and its
    per-output SQNR check where the INT8 model was calibrated from that FP32 model: qat-kd's weights were
    retrained, so its SQNR against the original model says nothing). `max_accuracy_drop` overrides the run's
    budget. Returns the Manifest."""
    from edgec import package
    from edgec.core.fsutil import atomic_path
    from edgec.modelio import load_model
    from edgec.pipeline import write_package
    if row.precision != "int8" or row.reference is None:
        raise OptionError(f"{row.recipe} is not an INT8 recipe made from an FP32 model; a package ships INT8")
    with atomic_path(path, force=force, directory=True, inputs=(*_reads(run.opts), run.root)) as tmp:
        shutil.copyfile(run.root / row.reference, tmp / package.FP32_FILE)
        shutil.copyfile(run.root / row.onnx, tmp / package.MODEL_FILE)
        fp32, int8 = OnnxModel.at(tmp / package.FP32_FILE), OnnxModel.at(tmp / package.MODEL_FILE, "int8")
        if int8.sha256 != row.sha256:
            raise VerifyError(f"{run.root / row.onnx} changed since it was measured; rerun compare (--fresh)")
        records = [StoredRecord(s) for s in row.stages]
        checks = dataclasses.replace(run.checks, **({"max_drop": max_accuracy_drop} if max_accuracy_drop is not None
                                                    else {}), **({"min_sqnr": float("-inf")} if row.recipe == "qat-kd"
                                                                 else {}))
        records.append(stages.evaluate(run.source.check_data, int8, fp32, checks))
        measured_fp32 = next((r for r in rows if r.onnx == row.reference), None)
        if row.bench:
            records.append(stages.BenchRecord(providers=list(run.opts.providers),
                                              seconds_per_model=run.opts.bench_seconds,
                                              shapes=run.source.sample_shapes(), int8=row.bench,
                                              fp32=measured_fp32.bench if measured_fp32 is not None else {}))
        arch = run.source.model.arch  # the spec the user already trusted
        module = load_model(run.root / row.student, arch).module if row.student else run.source.model.module
        return write_package(tmp, run.source, TorchModel(module), records, seconds=row.seconds,
                             extra={"compare": {"recipe": row.recipe, "folder": str(run.root),
                                                "sha256": row.sha256}})
