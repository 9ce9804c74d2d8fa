"""`edgec build`: model.pt -> (prune) -> (distill) -> ONNX FP32 -> INT8 -> accuracy check -> bench -> package.

The stages are edgec.stages' (shared with compare); the manifest is the sum of their records. Everything is
written into a temporary folder that is renamed to NAME.edgec only when every stage has passed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edgec import stages
from edgec.core.errors import OptionError
from edgec.core.fsutil import atomic_path
from edgec.source import Source, SourceSpec, load_source
from edgec.stages import OnnxModel, TorchModel


def _quant_defaults():
    from edgec.exporters.quantize import QuantOptions
    return QuantOptions()


@dataclass
class BuildOptions:
    source: SourceSpec
    output: str
    quant: object = field(default_factory=_quant_defaults)  # edgec.exporters.quantize.QuantOptions
    prune: object = None                 # edgec.prune.PruneConfig or None
    distill: object = None               # edgec.train.TrainConfig or None (fine-tune/distill after pruning)
    opset: int = 17
    max_accuracy_drop: float | None = 1.0
    min_sqnr: float | None = None        # dB, every output; None = edgec.exporters.metrics.DEFAULT_MIN_SQNR
    tasks: dict = field(default_factory=dict)  # output name -> task (--task); "" = the only output
    label_output: str | None = None      # the output labels apply to (--label-output); "none" ignores them
    fallback_seconds: float = 300.0      # time box of the sensitivity fallback; 0 = fail instead of falling back
    # without labels: the fallback's budget, every output's mean cosine to FP32 (0 = none: agreement alone)
    min_cosine: float | None = stages.DEFAULT_MIN_COSINE
    providers: tuple = ("cpu",)
    bench_seconds: float = 2.0           # per model and provider; 0 = no benchmark
    force: bool = False
    extra: dict = field(default_factory=dict)  # recorded verbatim in the manifest (e.g. {"demo": true})
    sign_key: str | None = None          # NAME.key from `edgec keygen`: the package is signed before it appears

    def validate(self) -> None:
        if self.opset < 17:
            raise OptionError(f"--opset {self.opset}: edgec needs opset 17 or newer")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:  # `not >=`: nan is refused too
            raise OptionError(f"--max-accuracy-drop {self.max_accuracy_drop}: a budget in points, 0 or more")
        stages.check_fallback_options(self.fallback_seconds, self.min_cosine)
        if not self.bench_seconds >= 0:
            raise OptionError(f"--bench-seconds {self.bench_seconds}: 0 (no benchmark) or more")
        if self.prune is not None:
            self.prune.validate()
        if self.distill is not None:
            self.distill.validate()

    def checks(self):
        """What the gate checks, per output (edgec.exporters.metrics.CheckOptions)."""
        from edgec.exporters.metrics import DEFAULT_MIN_SQNR, CheckOptions
        return CheckOptions(dict(self.tasks), self.label_output,
                            DEFAULT_MIN_SQNR if self.min_sqnr is None else self.min_sqnr, self.max_accuracy_drop)


def build(opts: BuildOptions):
    """Run every stage and write the package; returns its manifest (edgec.core.package.Manifest)."""
    from edgec import package
    from edgec.core.fsutil import check_writable
    from edgec.core.progress import note
    from edgec.core.signing import load_private_key

    started = time.perf_counter()
    opts.validate()
    reads = (opts.source.model, opts.source.data, opts.source.eval_data)
    check_writable(opts.output, opts.force, inputs=reads, directory=True)  # fail before hours of work, not after
    sign_key = load_private_key(opts.sign_key) if opts.sign_key else None  # a wrong key fails now, not after
    if opts.prune is not None and opts.distill is None:
        note("pruning without --distill loses accuracy; add --distill to recover it")
    checks = opts.checks()
    source = load_source(opts.source, checks=checks)
    records = [stages.load(source)]
    original = TorchModel(source.model.module, source.model.arch)
    model = original
    if opts.prune is not None:
        model, record = stages.prune(source, opts.prune)
        records.append(record)
    if opts.distill is not None:
        model, record = stages.distill(source, model, opts.distill)
        records.append(record)
    with atomic_path(opts.output, force=opts.force, directory=True, inputs=reads) as tmp:
        fp32, record = stages.export(source, model, tmp / package.FP32_FILE, opts.opset)
        records.append(record)
        budget = stages.fallback_budget(opts.max_accuracy_drop, opts.fallback_seconds, opts.min_cosine)
        int8, quantized = stages.quantize(source.calib, fp32, tmp / package.MODEL_FILE, opts.quant, budget, checks)
        records.append(quantized)
        records.append(stages.evaluate(source.check_data, int8, fp32, checks, quantized))
        if opts.bench_seconds > 0 and opts.providers:
            records.append(stages.bench(int8, fp32, list(opts.providers), opts.bench_seconds, source.sample_shapes()))
        return write_package(tmp, source, model, records, extra=opts.extra, seconds=time.perf_counter() - started,
                             sign_key=sign_key)


def write_package(folder: Path, source: Source, model: TorchModel, records: list, *, extra=None,
                  seconds: float = 0.0, sign_key=None):
    """The manifest from the stage records, the report, the hashes (and the signature): the one package
    writer (build, compare --package). Returns the edgec.core.package.Manifest."""
    from edgec import package
    manifest = package.make_manifest(folder, source, model.module, records, extra=extra, seconds=seconds)
    package.write_package_files(folder, manifest, sign_key=sign_key)
    return manifest


def export_model(spec: SourceSpec, output: str, *, opset: int = 17, force: bool = False) -> dict:
    """`edgec export`: the export stage alone; returns its summary. A model file that records its input shape
    needs no --data: the check against torch then runs on random inputs of that shape (and says so)."""
    source = load_source(spec, random_ok=True)
    with atomic_path(output, force=force, inputs=(spec.model, spec.data, spec.eval_data)) as tmp:
        onnx, record = stages.export(source, TorchModel(source.model.module), tmp, opset)
    info, check = record.info, record.check
    worst = max(check["outputs"].values(), key=lambda m: m["max_abs_err"])
    return {"output": str(output), "sha256": onnx.sha256, "bytes": info.file_bytes, "exporter": info.exporter,
            "opset": info.opset, "input": {"name": info.input_name, "shape": info.input_shape,
                                           "dtype": info.input_dtype},
            "outputs": [{"name": n, "shape": s, "dtype": d}
                        for n, s, d in zip(info.output_names, info.output_shapes, info.output_dtypes)],
            "check": {"data": record.check_data, "samples": check["samples"], "max_abs_err": worst["max_abs_err"],
                      "min_cosine": min(m["min_cosine"] for m in check["outputs"].values())},
            "warnings": info.warnings, "seconds": round(record.seconds, 2)}


def _check_onnx_labels(model, calib, check, checks) -> None:
    """--task, --label-output and the data's labels against the ONNX model's outputs before any long work, as
    load_source does for a torch model (quantize scored labels that could not fit as if there were none): one
    FP32 run on one sample gives the outputs' shapes."""
    import numpy as np
    from edgec.exporters.compare import iter_onnx, ort_session, output_batch_axis
    from edgec.exporters.metrics import check_labels, check_names
    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    check_names(names, checks, check.y is not None, list(check.named))
    _, outs = next(iter_onnx(sess, check.take(np.arange(1))))
    shapes = [tuple(np.delete(o.shape, output_batch_axis(sess, i))) if o.ndim else () for i, o in enumerate(outs)]
    for data in {id(d): d for d in (calib, check) if d.classes is None}.values():
        check_labels(names, shapes, data.labels, checks)   # a class folder's labels are implicit


def quantize_model(model: str, spec: SourceSpec, output: str, options, *, force: bool = False, checks=None,
                   fallback_seconds: float = 300.0, min_cosine: float | None = stages.DEFAULT_MIN_COSINE) -> dict:
    """`edgec quantize`: an ONNX model -> static INT8 calibrated on --data, checked against the FP32 model on
    up to 512 samples of --eval-data (else --data), every output with the gate's figures; returns its summary.
    Without labels in --data, the label-free fallback of build keeps the most sensitive nodes in FP32 until every
    output's mean cosine to FP32 reaches `min_cosine` (and the worst SQNR --min-sqnr) on calibration samples."""
    import numpy as np
    from edgec.data import load_data
    from edgec.exporters.compare import onnx_inputs
    from edgec.exporters.metrics import CheckOptions
    from edgec.exporters.onnx_export import check_onnx_file
    from edgec.source import DEFAULT_DATA, check_calibration_size
    check_onnx_file(model)
    checks = checks if checks is not None else CheckOptions()
    stages.check_fallback_options(fallback_seconds, min_cosine)
    kw = dict(image_size=spec.image_size, mean=spec.mean, std=spec.std)
    specs = onnx_inputs(model)
    calib = load_data(spec.data or DEFAULT_DATA, **kw).bind(specs)
    check_calibration_size(calib)
    check = load_data(spec.eval_data, **kw).bind(specs) if spec.eval_data else calib
    check = check.take(np.arange(min(512, len(check))))   # streamed
    _check_onnx_labels(model, calib, check, checks)
    # no accuracy budget here (quantize does not gate): labelled data gets no fallback
    budget = stages.fallback_budget(None, fallback_seconds, min_cosine)
    with atomic_path(output, force=force, inputs=(model, spec.data, spec.eval_data)) as tmp:
        fp32 = OnnxModel.at(model)
        int8, quantized = stages.quantize(calib, fp32, tmp, options, budget, checks)
        scored = stages.score(check, int8, fp32, checks, sqnr_reference=fp32)
    info, agreement = quantized.info, scored.agreement or {}
    labelled = next((o for o in scored.outputs if o["labels"] and o["task"] == "classify"), None)
    return {"output": str(output), "sha256": int8.sha256, "bytes": info.int8_bytes, "fp32_bytes": info.fp32_bytes,
            "size_ratio": info.size_ratio, "method": info.method, "samples": info.samples,
            "int8_weight_share": info.ops.get("int8_weight_share"), "excluded_nodes": info.excluded_nodes,
            "eval_data": check.source, "eval_samples": len(check),
            "fp32_accuracy": labelled["fp32_accuracy"] if labelled else None, "int8_accuracy": scored.accuracy,
            "top1_agreement": agreement.get("top1_agreement"), "min_sqnr_db": agreement.get("min_sqnr_db"),
            "outputs": scored.outputs, "quality": scored.quality, "seconds": round(quantized.seconds, 2),
            "fallback": stages.plain(quantized.fallback) if quantized.fallback is not None else None}
